/**
 * Guest agent sessions: one bidi stream per VM. The hub speaks the session
 * protocol (hello, welcome, policy, balloon state), authenticates the agent
 * (by the port it came in on, or by its configured id), checks what it
 * sends, and hands each message to the VM's supervisor as a typed call.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { PhaseEventSchema, type Hello, type SessionRequest, type SessionResponseSchema } from "../gen/ballast/v1/agent_pb.js";
import { BalloonReason, type MemorySample } from "../gen/ballast/v1/common_pb.js";
import { InvalidArgumentError, NotFoundError, PermissionDeniedError, ResourceExhaustedError, errorMessage } from "../shared/errors.js";
import type { BidiContext } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { LogLimiter, TokenBucket } from "../shared/rate-limit.js";
import { withTimeout } from "../shared/retry.js";
import { toNumber, toU64 } from "../shared/units.js";
import type { MigrationDefaults } from "./config.js";
import type { AgentLink, VmSupervisor } from "./vm-supervisor.js";

type SessionResponseInit = MessageInitShape<typeof SessionResponseSchema>;

/** Options for {@link AgentHub}. */
export interface AgentHubOptions {
  hostId: string;
  vms: ReadonlyMap<string, VmSupervisor>;
  defaults: MigrationDefaults;
  logger: Logger;
  /** How long a new session may take to send hello. Default 10000 ms. */
  helloTimeoutMs?: number;
  /** Minimum gap between BalloonState pushes to one agent. Default 500 ms. */
  balloonPushMs?: number;
  /** Sessions that may wait for their hello at once; more are refused. Default 64. */
  maxAwaitingHello?: number;
  /** Messages an agent may send per second (after a burst of twice that); more are dropped. Default 50. */
  messagesPerSecond?: number;
}

/** Serves AgentService.Session for this host's VMs. */
export class AgentHub {
  private readonly log: Logger;
  private readonly helloTimeoutMs: number;
  private readonly balloonPushMs: number;
  private attached = 0;
  private detached = 0;
  private awaitingHello = 0;
  private readonly maxAwaitingHello: number;
  private readonly messagesPerSecond: number;
  private readonly messageBurst: number;
  private readonly warnLimiter = new LogLimiter(10_000);

  constructor(private readonly options: AgentHubOptions) {
    this.log = options.logger.child({ component: "agent-hub" });
    this.helloTimeoutMs = options.helloTimeoutMs ?? 10_000;
    this.balloonPushMs = options.balloonPushMs ?? 500;
    this.maxAwaitingHello = options.maxAwaitingHello ?? 64;
    this.messagesPerSecond = options.messagesPerSecond ?? 50;
    this.messageBurst = 2 * this.messagesPerSecond;
  }

  /** Number of attached agents. */
  get size(): number {
    return this.attached;
  }

  /** Sessions that ended since start. */
  get detachedCount(): number {
    return this.detached;
  }

  /**
   * Serves one AgentService.Session call. `boundVm` is set when the call came
   * in on a VM's dedicated agent port: then the hello must name that VM.
   */
  async serve(ctx: BidiContext<SessionRequest, SessionResponseInit>, boundVm?: VmSupervisor): Promise<void> {
    const iterator = ctx[Symbol.asyncIterator]();
    if (this.awaitingHello >= this.maxAwaitingHello) {
      this.quietWarn(this.log, "*", "awaiting-hello", { limit: this.maxAwaitingHello }, "session refused: too many sessions have not said hello");
      throw new ResourceExhaustedError(`too many agent sessions (${this.maxAwaitingHello}) have not said hello yet; try again later`);
    }
    this.awaitingHello++;
    let first: IteratorResult<SessionRequest>;
    try {
      first = await withTimeout(iterator.next(), this.helloTimeoutMs, () => new InvalidArgumentError(`no hello within ${this.helloTimeoutMs} ms`));
    } finally {
      this.awaitingHello--;
    }
    if (first.done) return;
    if (first.value.msg.case !== "hello") throw new InvalidArgumentError("the first session message must be hello");
    const hello = first.value.msg.value;
    const vm = this.resolveVm(hello, boundVm);
    const log = this.log.child({ vm: vm.name, peer: ctx.peer, agentVersion: hello.agentVersion });

    let closeSession: (reason: string) => void = () => {};
    const closed = new Promise<string>((resolve) => (closeSession = resolve));
    let lastPush = 0;
    let pushTimer: NodeJS.Timeout | undefined;
    let pending: { targetBytes: number; actualBytes: number; ramBytes: number } | undefined;
    const sendBalloon = () => {
      if (!pending) return;
      const b = pending;
      pending = undefined;
      lastPush = Date.now();
      void ctx
        .send({ msg: { case: "balloonState", value: { targetBytes: toU64(b.targetBytes), actualBytes: toU64(b.actualBytes), ramBytes: toU64(b.ramBytes) } } })
        .catch(() => {});
    };
    const link: AgentLink = {
      hello,
      connectedAtMs: Date.now(),
      peer: ctx.peer,
      async sendPhase(e) {
        try {
          await ctx.send({ msg: { case: "phaseEvent", value: { ...e, deadlineUnixMs: BigInt(e.deadlineUnixMs) } } });
          return true;
        } catch (err) {
          log.warn({ err: errorMessage(err) }, "phase event not delivered");
          return false;
        }
      },
      pushBalloon: (state) => {
        // Coalesced: only the newest state matters, at most one per balloonPushMs.
        pending = state;
        const wait = this.balloonPushMs - (Date.now() - lastPush);
        if (wait <= 0) sendBalloon();
        else pushTimer ??= setTimeout(() => {
          pushTimer = undefined;
          sendBalloon();
        }, wait);
      },
      close: (reason) => closeSession(reason),
    };

    let attached = false;
    try {
      const phase = vm.currentPhase();
      await ctx.send({
        msg: {
          case: "welcome",
          value: {
            vmName: vm.name,
            hostId: this.options.hostId,
            currentPhase: phase ? create(PhaseEventSchema, { ...phase, deadlineUnixMs: BigInt(phase.deadlineUnixMs) }) : undefined,
          },
        },
      });
      const bounds = vm.bounds();
      await ctx.send({
        msg: {
          case: "policy",
          value: {
            floorBytes: toU64(bounds.floorBytes),
            maxBytes: toU64(bounds.maxBytes),
            sampleIntervalMs: this.options.defaults.sampleIntervalMs,
            steadyState: this.options.defaults.steadyState,
          },
        },
      });
      // Attached only after Welcome and Policy went out: the first thing an agent hears is Welcome.
      const previous = vm.attachAgent(link);
      previous?.close("replaced by a new session");
      attached = true;
      this.attached++;
      log.info({ capabilities: hello.capabilities, bootId: hello.bootId }, "agent attached");
      const budget = new TokenBucket(this.messageBurst, this.messagesPerSecond, Date.now());
      let dropped = 0;
      const loop = (async () => {
        for (;;) {
          const next = await iterator.next();
          if (next.done) return "agent closed the stream";
          if (!budget.take(Date.now())) {
            // Over its budget the agent loses messages; far over it, its session.
            dropped++;
            this.quietWarn(log, vm.name, "flood", { dropped, perSecond: this.messagesPerSecond }, "agent messages dropped: over the per-session budget");
            if (dropped >= 20 * this.messagesPerSecond) return `agent sent over ${dropped} messages beyond its budget`;
            continue;
          }
          this.onMessage(vm, link, next.value, log);
        }
      })();
      const why = await Promise.race([loop, closed]);
      log.info({ why }, "agent session ended");
    } catch (err) {
      log.info({ err: errorMessage(err) }, "agent session broke");
    } finally {
      if (pushTimer) clearTimeout(pushTimer);
      if (attached) {
        this.attached--;
        this.detached++;
        vm.detachAgent(link);
      }
    }
  }

  private resolveVm(hello: Hello, boundVm: VmSupervisor | undefined): VmSupervisor {
    if (!hello.vmId) throw new InvalidArgumentError("hello.vm_id is empty");
    if (boundVm) {
      if (boundVm.config.agentId !== hello.vmId) {
        throw new PermissionDeniedError(`agent on the port of VM ${boundVm.name} claims to be ${JSON.stringify(hello.vmId)}`);
      }
      return boundVm;
    }
    for (const vm of this.options.vms.values()) {
      if (vm.config.agentId === hello.vmId) {
        if (vm.config.agentPort !== 0) {
          throw new PermissionDeniedError(`VM ${vm.name} must attach on its own agent port ${vm.config.agentPort}`);
        }
        return vm;
      }
    }
    throw new NotFoundError(`no VM with agent id ${JSON.stringify(hello.vmId)} on this host`);
  }

  private onMessage(vm: VmSupervisor, link: AgentLink, msg: SessionRequest, log: Logger): void {
    switch (msg.msg.case) {
      case "sample": {
        const problem = checkSample(msg.msg.value);
        if (problem) {
          vm.agentAlive(link);
          this.quietWarn(log, vm.name, `sample:${problem}`, { problem }, "sample refused");
          return;
        }
        vm.agentSample(link, msg.msg.value);
        return;
      }
      case "balloonRequest": {
        const r = msg.msg.value;
        let targetBytes: number;
        try {
          targetBytes = toNumber(r.targetBytes);
        } catch {
          this.quietWarn(log, vm.name, "target-range", { reason: BalloonReason[r.reason] }, "balloon request refused: target out of range");
          return;
        }
        // Refusals are counted and logged (rate-limited) by the supervisor.
        void vm.agentBalloonRequest(link, { targetBytes, reason: r.reason, migrationId: r.migrationId, detail: r.detail });
        return;
      }
      case "phaseAck":
        vm.agentAck(link, msg.msg.value);
        return;
      case "hello":
        vm.agentAlive(link);
        this.quietWarn(log, vm.name, "hello", {}, "duplicate hello ignored");
        return;
      default:
        this.quietWarn(log, vm.name, "empty", {}, "empty session message ignored");
    }
  }

  /** A warning that hostile input can repeat at will: at most one line per VM and kind per 10 s. */
  private quietWarn(log: Logger, vm: string, kind: string, fields: Record<string, unknown>, msg: string): void {
    const suppressed = this.warnLimiter.admit(`${vm}:${kind}`, Date.now());
    if (suppressed !== undefined) log.warn({ ...fields, suppressed }, msg);
  }
}

/** Sanity checks on an untrusted sample; returns a problem description or "". */
export function checkSample(s: MemorySample): string {
  // Every integer field must be exact as a JS number: the domain converts them with toNumber.
  const maxSafe = BigInt(Number.MAX_SAFE_INTEGER);
  for (const [key, v] of Object.entries(s)) {
    if (typeof v === "bigint" && (v > maxSafe || v < -maxSafe)) return `${key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)} is not a safe integer`;
  }
  if (s.memTotalBytes === 0n) return "mem_total_bytes is 0";
  // Parts of RAM cannot exceed it (the agent's collector refuses the same set, agent/sample.ts sampleProblem).
  const parts = [
    ["mem_free_bytes", s.memFreeBytes],
    ["mem_available_bytes", s.memAvailableBytes],
    ["cached_bytes", s.cachedBytes],
    ["active_file_bytes", s.activeFileBytes],
    ["inactive_file_bytes", s.inactiveFileBytes],
    ["anon_bytes", s.anonBytes],
    ["shmem_bytes", s.shmemBytes],
    ["dirty_bytes", s.dirtyBytes],
  ] as const;
  for (const [field, v] of parts) if (v > s.memTotalBytes) return `${field} exceeds mem_total_bytes`;
  if (s.swapFreeBytes > s.swapTotalBytes) return "swap_free_bytes exceeds swap_total_bytes";
  if (!Number.isFinite(s.psiSomeAvg10) || s.psiSomeAvg10 < 0 || s.psiSomeAvg10 > 100) return "psi_some_avg10 outside [0, 100]";
  if (!Number.isFinite(s.psiFullAvg10) || s.psiFullAvg10 < 0 || s.psiFullAvg10 > 100) return "psi_full_avg10 outside [0, 100]";
  return "";
}
