/**
 * Guest agent sessions: one bidi stream per VM. The hub authenticates the
 * agent (by the port it came in on, or by its configured id), forwards its
 * balloon requests through the guard to the VM's balloon controller, keeps
 * its last memory sample, and fans phase events out to it.
 */
import { EventEmitter } from "node:events";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  type Hello,
  type PhaseAck,
  type PhaseEvent,
  PhaseEventSchema,
  type SessionRequest,
  type SessionResponseSchema,
} from "../gen/ballast/v1/agent_pb.js";
import { BalloonReason, type MemorySample, Phase } from "../gen/ballast/v1/common_pb.js";
import { InvalidArgumentError, NotFoundError, PermissionDeniedError, errorMessage } from "../shared/errors.js";
import type { BidiContext } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { toNumber, toU64 } from "../shared/units.js";
import { guardBalloonRequest } from "./balloon-guard.js";
import type { MigrationDefaults } from "./config.js";
import type { VmRuntime } from "./vm-runtime.js";

type SessionResponseInit = MessageInitShape<typeof SessionResponseSchema>;

/** Options for {@link AgentHub}. */
export interface AgentHubOptions {
  hostId: string;
  vms: ReadonlyMap<string, VmRuntime>;
  defaults: MigrationDefaults;
  logger: Logger;
  /** How long a new session may take to send hello. Default 10000 ms. */
  helloTimeoutMs?: number;
  /** Minimum gap between BalloonState pushes to one agent. Default 500 ms. */
  balloonPushMs?: number;
}

/** One attached agent. */
export interface AgentSession {
  readonly vmName: string;
  readonly hello: Hello;
  readonly connectedAtMs: number;
  readonly peer: string;
  send(msg: SessionResponseInit): Promise<void>;
  close(reason: string): void;
}

/**
 * Emits `connected` (vmName), `disconnected` (vmName), `ack` ({vmName, ack}),
 * `balloon-request` ({vmName, targetBytes, reason, accepted, why}).
 */
export class AgentHub extends EventEmitter {
  private readonly sessions = new Map<string, AgentSession>();
  private readonly log: Logger;
  private readonly helloTimeoutMs: number;
  private readonly balloonPushMs: number;

  constructor(private readonly options: AgentHubOptions) {
    super();
    this.log = options.logger.child({ component: "agent-hub" });
    this.helloTimeoutMs = options.helloTimeoutMs ?? 10_000;
    this.balloonPushMs = options.balloonPushMs ?? 500;
  }

  /** The attached session of a VM, if any. */
  session(vmName: string): AgentSession | undefined {
    return this.sessions.get(vmName);
  }

  /** Number of attached agents. */
  get size(): number {
    return this.sessions.size;
  }

  /** Sends a phase event to a VM's agent. Returns false when no agent is attached or the write failed. */
  async sendPhase(vmName: string, event: Omit<MessageInitShape<typeof PhaseEventSchema>, "$typeName">): Promise<boolean> {
    const s = this.sessions.get(vmName);
    if (!s) return false;
    try {
      await s.send({ msg: { case: "phaseEvent", value: event } });
      return true;
    } catch (err) {
      this.log.warn({ vm: vmName, err: errorMessage(err) }, "phase event not delivered");
      return false;
    }
  }

  /**
   * Serves one AgentService.Session call. `boundVm` is set when the call came
   * in on a VM's dedicated agent port: then the hello must name that VM.
   */
  async serve(ctx: BidiContext<SessionRequest, SessionResponseInit>, boundVm?: VmRuntime): Promise<void> {
    const iterator = ctx[Symbol.asyncIterator]();
    const first = await this.withTimeout(iterator.next(), this.helloTimeoutMs);
    if (first.done) return;
    if (first.value.msg.case !== "hello") throw new InvalidArgumentError("the first session message must be hello");
    const hello = first.value.msg.value;
    const vm = this.resolveVm(hello, boundVm);
    const name = vm.config.name;

    let closeSession: (reason: string) => void = () => {};
    const closed = new Promise<string>((resolve) => (closeSession = resolve));
    const session: AgentSession = {
      vmName: name,
      hello,
      connectedAtMs: Date.now(),
      peer: ctx.peer,
      send: (msg) => ctx.send(msg),
      close: (reason) => closeSession(reason),
    };
    const previous = this.sessions.get(name);
    if (previous) previous.close("replaced by a new session");
    this.sessions.set(name, session);
    const log = this.log.child({ vm: name, peer: ctx.peer, agentVersion: hello.agentVersion });
    log.info({ capabilities: hello.capabilities, bootId: hello.bootId }, "agent attached");

    let lastPush = 0;
    let pushTimer: NodeJS.Timeout | undefined;
    const pushBalloon = () => {
      const b = vm.balloon;
      if (!b || b.actualBytes === undefined) return;
      const now = Date.now();
      if (now - lastPush < this.balloonPushMs) {
        pushTimer ??= setTimeout(() => {
          pushTimer = undefined;
          pushBalloon();
        }, this.balloonPushMs - (now - lastPush));
        return;
      }
      lastPush = now;
      void session
        .send({
          msg: {
            case: "balloonState",
            value: { targetBytes: toU64(b.targetBytes ?? vm.ramBytes), actualBytes: toU64(b.actualBytes), ramBytes: toU64(vm.ramBytes) },
          },
        })
        .catch(() => {});
    };
    vm.on("balloon", pushBalloon);

    try {
      const m = vm.migration;
      await session.send({
        msg: {
          case: "welcome",
          value: {
            vmName: name,
            hostId: this.options.hostId,
            currentPhase: m
              ? create(PhaseEventSchema, { migrationId: m.id, phase: m.phase, mode: m.mode, pass: m.pass, deadlineUnixMs: BigInt(m.deadlineUnixMs) })
              : undefined,
          },
        },
      });
      const balloonCtl = vm.balloon;
      const floor = balloonCtl ? balloonCtl.clamp(0) : vm.config.floorBytes;
      const max = balloonCtl ? balloonCtl.clamp(Number.MAX_SAFE_INTEGER) : vm.ramBytes;
      await session.send({
        msg: {
          case: "policy",
          value: {
            floorBytes: toU64(floor),
            maxBytes: toU64(max),
            sampleIntervalMs: this.options.defaults.sampleIntervalMs,
            steadyState: this.options.defaults.steadyState,
          },
        },
      });
      pushBalloon();
      this.emit("connected", name);

      const loop = (async () => {
        for (;;) {
          const next = await iterator.next();
          if (next.done) return "agent closed the stream";
          this.onMessage(vm, next.value, log);
        }
      })();
      const why = await Promise.race([loop, closed]);
      log.info({ why }, "agent session ended");
    } catch (err) {
      log.info({ err: errorMessage(err) }, "agent session broke");
    } finally {
      vm.off("balloon", pushBalloon);
      if (pushTimer) clearTimeout(pushTimer);
      if (this.sessions.get(name) === session) {
        this.sessions.delete(name);
        this.emit("disconnected", name);
      }
    }
  }

  private resolveVm(hello: Hello, boundVm: VmRuntime | undefined): VmRuntime {
    if (!hello.vmId) throw new InvalidArgumentError("hello.vm_id is empty");
    if (boundVm) {
      if (boundVm.config.agentId !== hello.vmId) {
        throw new PermissionDeniedError(`agent on the port of VM ${boundVm.config.name} claims to be ${JSON.stringify(hello.vmId)}`);
      }
      return boundVm;
    }
    for (const vm of this.options.vms.values()) {
      if (vm.config.agentId === hello.vmId) {
        if (vm.config.agentPort !== 0) {
          throw new PermissionDeniedError(`VM ${vm.config.name} must attach on its own agent port ${vm.config.agentPort}`);
        }
        return vm;
      }
    }
    throw new NotFoundError(`no VM with agent id ${JSON.stringify(hello.vmId)} on this host`);
  }

  private onMessage(vm: VmRuntime, msg: SessionRequest, log: Logger): void {
    switch (msg.msg.case) {
      case "sample": {
        const problem = checkSample(msg.msg.value);
        if (problem) {
          log.warn({ problem }, "sample refused");
          return;
        }
        vm.lastSample = msg.msg.value;
        vm.lastSampleAtMs = Date.now();
        return;
      }
      case "balloonRequest":
        void this.onBalloonRequest(vm, msg.msg.value.targetBytes, msg.msg.value.reason, msg.msg.value.migrationId, msg.msg.value.detail, log);
        return;
      case "phaseAck":
        this.emit("ack", { vmName: vm.config.name, ack: msg.msg.value as PhaseAck });
        return;
      case "hello":
        log.warn("duplicate hello ignored");
        return;
      default:
        log.warn("empty session message ignored");
    }
  }

  private async onBalloonRequest(vm: VmRuntime, target: bigint, reason: BalloonReason, migrationId: string, detail: string, log: Logger): Promise<void> {
    const name = vm.config.name;
    const ctl = vm.balloon;
    let targetBytes: number;
    try {
      targetBytes = toNumber(target);
    } catch {
      this.emit("balloon-request", { vmName: name, targetBytes: Number.NaN, reason, accepted: false, why: "target out of range" });
      return;
    }
    if (!ctl) {
      log.warn({ targetBytes }, "balloon request while QMP is down: dropped");
      this.emit("balloon-request", { vmName: name, targetBytes, reason, accepted: false, why: "QMP not connected" });
      return;
    }
    const verdict = guardBalloonRequest(
      { targetBytes, reason, migrationId },
      {
        floorBytes: ctl.clamp(0),
        maxBytes: ctl.clamp(Number.MAX_SAFE_INTEGER),
        currentTargetBytes: ctl.targetBytes ?? ctl.actualBytes,
        migration: vm.migration ? { id: vm.migration.id, phase: vm.migration.phase, direction: vm.migration.direction } : undefined,
      },
    );
    if (!verdict.accept) {
      log.warn({ targetBytes, reason: BalloonReason[reason], why: verdict.why }, "balloon request refused");
      this.emit("balloon-request", { vmName: name, targetBytes, reason, accepted: false, why: verdict.why });
      return;
    }
    try {
      const applied = await ctl.setTarget(verdict.targetBytes, { force: verdict.force, reason: BalloonReason[reason] });
      log.info({ requested: targetBytes, applied, reason: BalloonReason[reason], detail }, "balloon target set");
      this.emit("balloon-request", { vmName: name, targetBytes: applied, reason, accepted: true, why: "" });
    } catch (err) {
      log.warn({ err: errorMessage(err) }, "balloon request failed in QEMU");
      this.emit("balloon-request", { vmName: name, targetBytes, reason, accepted: false, why: errorMessage(err) });
    }
  }

  private withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new InvalidArgumentError(`no hello within ${ms} ms`)), ms);
      p.then(
        (v) => {
          clearTimeout(t);
          resolve(v);
        },
        (e: unknown) => {
          clearTimeout(t);
          reject(e);
        },
      );
    });
  }
}

/** Sanity checks on an untrusted sample; returns a problem description or "". */
export function checkSample(s: MemorySample): string {
  if (s.memTotalBytes === 0n) return "mem_total_bytes is 0";
  if (s.memFreeBytes > s.memTotalBytes) return "mem_free_bytes exceeds mem_total_bytes";
  if (s.memAvailableBytes > s.memTotalBytes) return "mem_available_bytes exceeds mem_total_bytes";
  if (s.cachedBytes > s.memTotalBytes) return "cached_bytes exceeds mem_total_bytes";
  if (!Number.isFinite(s.psiSomeAvg10) || s.psiSomeAvg10 < 0 || s.psiSomeAvg10 > 100) return "psi_some_avg10 outside [0, 100]";
  if (!Number.isFinite(s.psiFullAvg10) || s.psiFullAvg10 < 0 || s.psiFullAvg10 > 100) return "psi_full_avg10 outside [0, 100]";
  return "";
}

/** Phases after which an agent returns to its steady state. */
export const TERMINAL_PHASES: ReadonlySet<Phase> = new Set([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED]);

/** Convenience for building a PhaseEvent message. */
export function phaseEvent(init: Omit<MessageInitShape<typeof PhaseEventSchema>, "$typeName">): PhaseEvent {
  return create(PhaseEventSchema, init);
}
