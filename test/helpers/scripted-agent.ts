/**
 * A scripted guest agent for coordinator tests: speaks the real
 * AgentService.Session protocol over gRPC, records what it receives, and
 * answers PREPARE the way the test tells it to.
 */
import { AgentService, type SessionResponse } from "../../gen/ballast/v1/agent_pb.js";
import { BalloonReason, Phase } from "../../gen/ballast/v1/common_pb.js";
import { createClient, type BidiStream } from "../../shared/grpc-adapter.js";

/** What the scripted agent saw. */
export interface ScriptedAgent {
  phases: { phase: Phase; pass: number; migrationId: string }[];
  messages: SessionResponse[];
  /** Sends a balloon request. */
  request(targetBytes: number, reason: BalloonReason, migrationId?: string): Promise<void>;
  /** Resolves when a phase (and optionally a predicate) is seen. */
  waitFor(phase: Phase, timeoutMs?: number): Promise<void>;
  /** Resolves with the stream's end error, if any. */
  ended: Promise<unknown>;
  close(): void;
}

/** Options for {@link attachScriptedAgent}. */
export interface ScriptedAgentOptions {
  address: string;
  vmId: string;
  /** Target to request on PREPARE; undefined means ignore PREPARE (a silent agent). */
  prepareTargetBytes?: number;
}

/** Connects, says hello and starts recording. */
export async function attachScriptedAgent(o: ScriptedAgentOptions): Promise<ScriptedAgent> {
  const client = createClient(AgentService, o.address);
  const stream: BidiStream<Parameters<ReturnType<typeof client.session>["send"]>[0], SessionResponse> = client.session();
  const phases: ScriptedAgent["phases"] = [];
  const messages: SessionResponse[] = [];
  const waiters: { phase: Phase; resolve: () => void }[] = [];
  await stream.send({ msg: { case: "hello", value: { vmId: o.vmId, agentVersion: "scripted-1", capabilities: ["test"] } } });
  let welcomed: () => void = () => {};
  const welcome = new Promise<void>((r) => (welcomed = r));
  const ended = (async () => {
    try {
      for await (const msg of stream) {
        messages.push(msg);
        if (msg.msg.case === "welcome") welcomed();
        if (msg.msg.case !== "phaseEvent") continue;
        const ev = msg.msg.value;
        phases.push({ phase: ev.phase, pass: ev.pass, migrationId: ev.migrationId });
        for (const w of waiters.filter((x) => x.phase === ev.phase)) w.resolve();
        if (ev.phase === Phase.PREPARE && o.prepareTargetBytes !== undefined) {
          await stream.send({ msg: { case: "balloonRequest", value: { targetBytes: BigInt(o.prepareTargetBytes), reason: BalloonReason.PREPARE, migrationId: ev.migrationId, detail: "scripted" } } });
          await stream.send({ msg: { case: "phaseAck", value: { migrationId: ev.migrationId, phase: ev.phase, targetBytes: BigInt(o.prepareTargetBytes) } } });
        }
      }
      return undefined;
    } catch (err) {
      return err;
    }
  })();
  await Promise.race([welcome, ended.then((e) => Promise.reject(e ?? new Error("stream ended before welcome")))]);
  return {
    phases,
    messages,
    ended,
    request: (targetBytes, reason, migrationId = "") =>
      stream.send({ msg: { case: "balloonRequest", value: { targetBytes: BigInt(targetBytes), reason, migrationId, detail: "scripted" } } }),
    waitFor(phase, timeoutMs = 60_000) {
      if (phases.some((p) => p.phase === phase)) return Promise.resolve();
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`phase ${Phase[phase]} not seen in ${timeoutMs} ms; saw ${phases.map((p) => Phase[p.phase]).join(",")}`)), timeoutMs);
        waiters.push({ phase, resolve: () => (clearTimeout(t), resolve()) });
      });
    },
    close() {
      stream.cancel();
      client.close();
    },
  };
}
