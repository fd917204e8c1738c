/**
 * Many simulated guest agents in one process, for bench/coordinator-fanout.ts.
 * Run as a child with an IPC channel: `node --import tsx bench/simulated-agents.ts`
 * (child_process.fork does that). Never run it by hand: it waits for commands.
 *
 * Each agent speaks the real AgentService.Session protocol over real gRPC on
 * its own TCP connection (a local subchannel pool per agent, as separate
 * guests would have) with the production agent's keepalive options: hello,
 * then a MemorySample at `sampleHz` built from a real guest capture with a
 * little jitter, and it records when each PhaseEvent arrives, on the clock
 * `performance.timeOrigin + performance.now()` that the parent uses too.
 *
 * Safety: the process exits by itself after `lifetimeMs`, and as soon as the
 * parent's IPC channel closes. It only ever dials the address the parent
 * gives, which the parent takes from a coordinator it bound on 127.0.0.1.
 */
import { readFileSync } from "node:fs";
import { isEntryPoint } from "../shared/entry-point.js";
import { join, resolve } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { AGENT_CHANNEL_OPTIONS } from "../agent/session.js";
import { parseMeminfo, parsePsi, parseVmstat } from "../agent/procfs.js";
import { toMemorySample } from "../agent/wire.js";
import { AgentService, SessionRequestSchema, type SessionResponse } from "../gen/ballast/v1/agent_pb.js";
import type { MemorySampleSchema } from "../gen/ballast/v1/common_pb.js";
import { serviceDefinition } from "../shared/grpc-adapter.js";

const ROOT = resolve(import.meta.dirname, "..");

/** Parent → child commands. */
export type ToAgents =
  | { type: "clock"; id: number }
  | { type: "attach"; address: string; vmIds: string[]; firstIndex: number; sampleHz: number; concurrency: number; timeoutMs: number }
  | { type: "counters" }
  | { type: "collect" }
  | { type: "stop" };

/** Counters the child keeps since attach. */
export interface AgentCounters {
  /** Samples whose write completed. */
  samplesSent: number;
  /** Sample writes that failed. */
  sampleErrors: number;
  /** Streams that ended or failed after attach. */
  streamsEnded: number;
  /** PhaseEvents received in total. */
  phaseEvents: number;
}

/** Child → parent replies. */
export type FromAgents =
  | { type: "loaded"; pid: number }
  | { type: "clock"; id: number; now: number }
  | { type: "attached"; ok: number; failed: number; errors: string[]; ms: number }
  | { type: "counters"; counters: AgentCounters }
  | {
      type: "arrivals";
      /** Flat triples: agent index (firstIndex + position in vmIds), fan-out index (PhaseEvent.pass - 1), arrival time (ms, timeOrigin + now). */
      data: number[];
      counters: AgentCounters;
      /** Arrivals whose migration id did not parse (should be 0). */
      unknown: number;
    };

/** The migration id the fan-out bench puts in its PhaseEvents; the pass carries the fan-out index + 1. */
export const FANOUT_MIGRATION_ID = "bench-fanout";

/** Arguments passed as argv[2] (JSON). */
export interface AgentsArgs {
  /** Hard lifetime: the process exits with status 3 after this long, whatever happens. */
  lifetimeMs: number;
}

type SampleInit = MessageInitShape<typeof MemorySampleSchema>;

const now = () => performance.timeOrigin + performance.now();

/** A realistic sample: a real idle 1 GiB Debian 6.1 lab guest (test/fixtures/proc/debian-6.1-guest). */
export function baseSample(): SampleInit {
  const dir = join(ROOT, "test/fixtures/proc/debian-6.1-guest");
  const meminfo = parseMeminfo(readFileSync(join(dir, "meminfo"), "utf8"));
  const vmstat = parseVmstat(readFileSync(join(dir, "vmstat"), "utf8"));
  const psi = parsePsi(readFileSync(join(dir, "pressure/memory"), "utf8"));
  const s = toMemorySample(
    {
      timestampMs: Date.now(),
      monotonicMs: performance.now(),
      meminfo,
      vmstat,
      psi,
      watermarks: { minFreeBytes: 45056 * 1024, highBytes: 3 * 45056 * 1024, source: "estimate" },
      balloon: { bytes: 0, source: "vmstat-counters" },
    },
    undefined,
  );
  // The real agent fills these from its estimate; keep them plausible.
  s.workingSetBytes = BigInt(meminfo.memTotal - meminfo.memAvailable + meminfo.activeFile);
  s.unreclaimableBytes = BigInt(meminfo.memTotal - meminfo.memAvailable);
  return s;
}

const MiB = 1024n * 1024n;

/** The next sample of one agent: the base with a few MiB of jitter and growing counters. */
function nextSample(base: SampleInit, tick: number): SampleInit {
  const jitter = BigInt(Math.floor(Math.random() * 8)) * MiB;
  const total = base.memTotalBytes as bigint;
  const clamp = (v: bigint) => (v > total ? total : v < 0n ? 0n : v);
  return {
    ...base,
    timestampMs: BigInt(Date.now()),
    memFreeBytes: clamp((base.memFreeBytes as bigint) - jitter),
    memAvailableBytes: clamp((base.memAvailableBytes as bigint) - jitter / 2n),
    cachedBytes: clamp((base.cachedBytes as bigint) + jitter / 2n),
    pgmajfault: (base.pgmajfault as bigint) + BigInt(tick),
    psiSomeTotalUs: (base.psiSomeTotalUs as bigint) + BigInt(tick * 3),
  };
}

interface Agent {
  index: number;
  client: grpc.Client;
  call: grpc.ClientDuplexStream<unknown, unknown>;
  timer?: NodeJS.Timeout;
  ended: boolean;
}

function main(): void {
  if (typeof process.send !== "function") {
    process.stderr.write("simulated-agents: must be started by bench/coordinator-fanout.ts with an IPC channel\n");
    process.exit(2);
  }
  const args = JSON.parse(process.argv[2] ?? "{}") as Partial<AgentsArgs>;
  const lifetimeMs = Math.min(Math.max(args.lifetimeMs ?? 120_000, 1_000), 30 * 60_000);
  setTimeout(() => {
    process.stderr.write(`simulated-agents: lifetime of ${lifetimeMs} ms reached, exiting\n`);
    process.exit(3);
  }, lifetimeMs);
  process.on("disconnect", () => process.exit(0));

  const send = (msg: FromAgents) => process.send?.(msg);
  const def = serviceDefinition(AgentService).session as grpc.MethodDefinition<unknown, unknown>;
  const base = baseSample();
  const agents: Agent[] = [];
  const arrivals: number[] = [];
  let unknownArrivals = 0;
  const counters: AgentCounters = { samplesSent: 0, sampleErrors: 0, streamsEnded: 0, phaseEvents: 0 };
  let stopping = false;

  const stopAll = () => {
    stopping = true;
    for (const a of agents) {
      if (a.timer) clearTimeout(a.timer);
      a.call.cancel();
      a.client.close();
    }
  };

  const attachOne = (address: string, vmId: string, index: number, sampleHz: number, timeoutMs: number): Promise<void> =>
    new Promise((resolveAttach, rejectAttach) => {
      const client = new grpc.Client(address, grpc.credentials.createInsecure(), {
        ...AGENT_CHANNEL_OPTIONS,
        // One TCP connection per agent, like separate guests; grpc-js would otherwise share one.
        "grpc.use_local_subchannel_pool": 1,
      });
      const call = client.makeBidiStreamRequest(def.path, def.requestSerialize, def.responseDeserialize, new grpc.Metadata());
      const agent: Agent = { index, client, call, ended: false };
      agents.push(agent);
      let welcomed = false;
      const t = setTimeout(() => {
        if (!welcomed) rejectAttach(new Error(`${vmId}: no welcome in ${timeoutMs} ms`));
      }, timeoutMs);
      call.on("data", (raw: unknown) => {
        const at = now();
        const msg = raw as SessionResponse;
        if (msg.msg.case === "phaseEvent") {
          counters.phaseEvents++;
          const ev = msg.msg.value;
          if (ev.migrationId === FANOUT_MIGRATION_ID && ev.pass >= 1) arrivals.push(index, ev.pass - 1, at);
          else unknownArrivals++;
        } else if (msg.msg.case === "welcome" && !welcomed) {
          welcomed = true;
          clearTimeout(t);
          resolveAttach();
          // Agents boot at different times: spread the first sample over one period.
          const periodMs = 1000 / sampleHz;
          let tick = 0;
          const loop = () => {
            if (stopping || agent.ended) return;
            tick++;
            const req = create(SessionRequestSchema, { msg: { case: "sample", value: nextSample(base, tick) } });
            call.write(req, (err?: Error | null) => {
              if (err) counters.sampleErrors++;
              else counters.samplesSent++;
            });
            agent.timer = setTimeout(loop, periodMs);
          };
          agent.timer = setTimeout(loop, Math.random() * periodMs);
        }
      });
      const onEnd = (err?: Error) => {
        if (agent.ended) return;
        agent.ended = true;
        if (agent.timer) clearTimeout(agent.timer);
        if (!stopping) counters.streamsEnded++;
        if (!welcomed) {
          clearTimeout(t);
          rejectAttach(err ?? new Error(`${vmId}: stream ended before welcome`));
        }
      };
      call.on("error", (err: Error) => onEnd(err));
      call.on("end", () => onEnd());
      call.write(create(SessionRequestSchema, { msg: { case: "hello", value: { vmId, agentVersion: "bench-sim-1", capabilities: ["psi", "postcopy-demand"], bootId: `bench-${vmId}` } } }));
    });

  const attachAll = async (cmd: Extract<ToAgents, { type: "attach" }>) => {
    const started = now();
    let next = 0;
    let ok = 0;
    const errors: string[] = [];
    const worker = async () => {
      while (next < cmd.vmIds.length && !stopping) {
        const i = next++;
        try {
          await attachOne(cmd.address, cmd.vmIds[i] as string, cmd.firstIndex + i, cmd.sampleHz, cmd.timeoutMs);
          ok++;
        } catch (err) {
          errors.push(err instanceof Error ? err.message : String(err));
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, cmd.concurrency) }, worker));
    send({ type: "attached", ok, failed: cmd.vmIds.length - ok, errors: errors.slice(0, 5), ms: now() - started });
  };

  process.on("message", (raw: unknown) => {
    const cmd = raw as ToAgents;
    switch (cmd.type) {
      case "clock":
        send({ type: "clock", id: cmd.id, now: now() });
        break;
      case "attach":
        void attachAll(cmd);
        break;
      case "counters":
        send({ type: "counters", counters: { ...counters } });
        break;
      case "collect":
        send({ type: "arrivals", data: arrivals.slice(), counters: { ...counters }, unknown: unknownArrivals });
        break;
      case "stop":
        stopAll();
        // Let the cancels reach the wire, then go.
        setTimeout(() => process.exit(0), 200);
        break;
    }
  });
  send({ type: "loaded", pid: process.pid });
}


// Importing this module (for its types and constants) must not start agents.
if (isEntryPoint(import.meta.url)) main();
