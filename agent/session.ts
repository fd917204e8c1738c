/**
 * The gRPC session with the host coordinator (AgentService.Session): Hello
 * first, then a sample every interval (decided on locally; reported to the
 * coordinator every few seconds or when something changed, see
 * runtime.reportDue), balloon requests and phase acks from the state
 * machine; keepalive, and re-attach with exponential backoff and jitter
 * whenever the stream breaks.
 *
 * Why keepalive matters: after a live migration the guest's TCP connection is
 * dead on the destination and a receive-only stream never notices. With a
 * ~2 s keepalive the call fails with UNAVAILABLE about 1.5 s after resume; the
 * re-attach then reaches the DESTINATION's coordinator at the same address,
 * whose Welcome (new host_id, current_phase e.g. POSTCOPY_ACTIVE) tells the
 * agent where it is.
 */
import * as grpc from "@grpc/grpc-js";
import { AgentService, type SessionResponse } from "../gen/ballast/v1/agent_pb.js";
import { createClient, type BidiStream } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { silentLogger } from "../shared/logger.js";
import { errorMessage } from "../shared/errors.js";
import { Phase } from "../gen/ballast/v1/common_pb.js";
import { Actuator, type FreeMemoryZeroer, type PageCacheReclaimer } from "./act.js";
import {
  DEFAULT_RUNTIME_OPTIONS,
  awaitingPrepare,
  initialState,
  onBalloonState,
  onPhaseEvent,
  onPrepareCheck,
  onPolicy,
  onTick,
  onWelcome,
  sampleIntervalMs,
  type Effect,
  type RuntimeOptions,
  type RuntimeState,
} from "./runtime.js";
import type { Collector, Sample } from "./sample.js";
import { AGENT_VERSION } from "./version.js";
import { balloonFrom, phaseSignalFrom, policyFrom, type SessionRequestInit } from "./wire.js";

/** Re-attach backoff. */
export interface BackoffOptions {
  /** First delay. Default 100 ms: after a migration the destination is usually ready at once. */
  initialMs: number;
  /** Ceiling. Default 5000 ms. */
  maxMs: number;
  /** Growth per failed attempt. Default 2. */
  factor: number;
}

/** The defaults of {@link BackoffOptions}. */
export const DEFAULT_BACKOFF: Readonly<BackoffOptions> = Object.freeze({ initialMs: 100, maxMs: 5000, factor: 2 });

/**
 * Delay before attempt `attempt` (0 = first retry): "equal jitter", half
 * fixed and half random, so a fleet of agents that lost the same host does
 * not reconnect in lockstep, yet no agent waits less than half the step.
 */
export function backoffDelayMs(attempt: number, options: BackoffOptions = DEFAULT_BACKOFF, random: () => number = Math.random): number {
  const step = Math.min(options.maxMs, options.initialMs * options.factor ** Math.max(0, attempt));
  return Math.round(step / 2 + random() * (step / 2));
}

/** gRPC channel options for the agent: keepalive as the rig measured, fast reconnects. */
export const AGENT_CHANNEL_OPTIONS: grpc.ChannelOptions = Object.freeze({
  "grpc.keepalive_time_ms": 2000,
  "grpc.keepalive_timeout_ms": 1000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2000,
});

/** Options for {@link AgentSession}. */
export interface AgentSessionOptions {
  /** Coordinator address, host:port. */
  coordinator: string;
  /** Hello.vm_id. */
  vmId: string;
  collector: Collector;
  /** Null disables page-cache reclaim. Default: none (the caller decides). */
  reclaimer?: PageCacheReclaimer | null;
  /** Zeroes free memory after the PREPARE inflation. Null or absent: off (and Hello does not announce "zero-free"). */
  zeroer?: FreeMemoryZeroer | null;
  /** State machine and policy tuning. Default {@link DEFAULT_RUNTIME_OPTIONS}. */
  runtime?: RuntimeOptions;
  /** Default {@link DEFAULT_BACKOFF}. */
  backoff?: BackoffOptions;
  /** Give up an attach that has no Welcome after this long. Default 10000 ms. */
  welcomeTimeoutMs?: number;
  /** Extra channel options, merged over {@link AGENT_CHANNEL_OPTIONS}. */
  channelOptions?: grpc.ChannelOptions;
  logger?: Logger;
  /** Default Math.random; tests pin it. */
  random?: () => number;
  /** Wall clock (Unix ms), for PREPARE deadlines. Default Date.now. */
  now?: () => number;
}

/** The session client. `start()` runs until `stop()`. */
export class AgentSession {
  private readonly opts: AgentSessionOptions;
  private readonly runtimeOptions: RuntimeOptions;
  private readonly log: Logger;
  private readonly actuator: Actuator;
  private runtime: RuntimeState = initialState();
  private stopped = true;
  private loopDone: Promise<void> = Promise.resolve();
  private stream: BidiStream<SessionRequestInit, SessionResponse> | undefined;
  private chain: Promise<void> = Promise.resolve();
  private tickTimer: NodeJS.Timeout | undefined;
  private tickDueAt = 0;
  private prepareTimer: NodeJS.Timeout | undefined;
  /** Cuts a running zeroing short when the migration moves on or the stream ends. */
  private zeroAbort: AbortController | undefined;
  private wake: (() => void) | undefined;
  private lastSampleError = { message: "", at: 0 };
  private hostId = "";
  private attachCount = 0;

  constructor(options: AgentSessionOptions) {
    this.opts = options;
    const runtime = options.runtime ?? DEFAULT_RUNTIME_OPTIONS;
    // Without a zeroer the PREPARE ack must not wait for anything: it follows the request at once.
    this.runtimeOptions = { ...runtime, zeroFree: runtime.zeroFree && !!options.zeroer };
    this.log = options.logger ?? silentLogger();
    this.actuator = new Actuator({
      send: (req) => this.send(req),
      reclaimer: options.reclaimer ?? null,
      zeroer: options.zeroer ?? null,
      sample: () => this.trySample(),
      policy: this.runtimeOptions.policy,
      logger: this.log,
    });
  }

  /** The state machine's current state (read-only view, for status and tests). */
  get state(): Readonly<RuntimeState> {
    return this.runtime;
  }

  /** The host_id of the coordinator that last welcomed the agent. */
  get currentHostId(): string {
    return this.hostId;
  }

  /** Starts the attach loop in the background. */
  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.loopDone = this.loop().catch((err: unknown) => this.log.error({ err: errorMessage(err) }, "session loop crashed"));
  }

  /** Stops: cancels the stream and timers, and waits for the loop to end. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.clearTick();
    this.clearPrepareCheck();
    this.zeroAbort?.abort();
    this.stream?.cancel();
    this.wake?.();
    await this.loopDone;
    await this.chain;
  }

  private async loop(): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      const welcomed = await this.attachOnce(failures > 0);
      if (this.stopped) break;
      failures = welcomed ? 0 : failures + 1;
      const delay = backoffDelayMs(failures, this.opts.backoff ?? DEFAULT_BACKOFF, this.opts.random ?? Math.random);
      this.log[failures <= 1 ? "info" : "debug"]({ delayMs: delay, failures }, "re-attaching after backoff");
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }

  /**
   * One attach: returns whether a Welcome arrived (resets the backoff).
   * `retrying` keeps a long coordinator outage from filling the guest's journal: only the first failure warns.
   */
  private async attachOnce(retrying: boolean): Promise<boolean> {
    const client = createClient(AgentService, this.opts.coordinator, grpc.credentials.createInsecure(), {
      ...AGENT_CHANNEL_OPTIONS,
      ...this.opts.channelOptions,
    });
    const stream = client.session();
    this.stream = stream;
    this.attachCount++;
    let welcomed = false;
    const welcomeTimer = setTimeout(() => {
      if (!welcomed) {
        this.log.warn({ coordinator: this.opts.coordinator }, "no Welcome in time: re-attaching");
        stream.cancel();
      }
    }, this.opts.welcomeTimeoutMs ?? 10_000);
    try {
      await stream.send({ msg: { case: "hello", value: this.hello() } });
      for await (const response of stream) {
        if (response.msg.case === "welcome") welcomed = true;
        // Read before queueing: a zeroing in progress must stop as soon as the migration moves past PREPARE.
        if (response.msg.case === "phaseEvent" && response.msg.value.phase !== Phase.PREPARE) this.zeroAbort?.abort();
        await this.enqueue(() => this.handle(response));
      }
      if (!this.stopped) this.log.warn({}, "coordinator ended the session");
    } catch (err) {
      if (!this.stopped) this.log[retrying ? "debug" : "warn"]({ err: errorMessage(err), code: (err as { code?: number }).code }, "session stream failed");
    } finally {
      clearTimeout(welcomeTimer);
      this.clearTick();
      this.clearPrepareCheck();
      this.zeroAbort?.abort();
      if (this.stream === stream) this.stream = undefined;
      stream.cancel();
      client.close();
    }
    return welcomed;
  }

  private hello() {
    const capabilities = ["postcopy-demand"];
    if (this.opts.collector.hasPsi()) capabilities.push("psi");
    const method = this.opts.reclaimer && this.runtimeOptions.dropCaches ? this.opts.reclaimer.method() : "none";
    if (method === "memory.reclaim") capabilities.push("memory-reclaim");
    if (method === "drop_caches") capabilities.push("drop-caches");
    // The PREPARE ack comes only after the balloon inflated and free memory was zeroed: worth waiting for.
    if (this.runtimeOptions.zeroFree) capabilities.push("zero-free");
    return { vmId: this.opts.vmId, agentVersion: AGENT_VERSION, capabilities, bootId: this.opts.collector.bootId() };
  }

  private async send(request: SessionRequestInit): Promise<void> {
    const stream = this.stream;
    if (!stream) throw new Error("not attached");
    await stream.send(request);
  }

  /** Serializes message handling and ticks: both read and write the runtime state. */
  private enqueue(work: () => Promise<void>): Promise<void> {
    const run = this.chain.then(work).catch((err: unknown) => {
      this.log.warn({ err: errorMessage(err) }, "session step failed");
    });
    this.chain = run;
    return run;
  }

  private async handle(response: SessionResponse): Promise<void> {
    const now = (this.opts.now ?? Date.now)();
    const msg = response.msg;
    switch (msg.case) {
      case "welcome": {
        const w = msg.value;
        if (this.hostId && w.hostId !== this.hostId) this.log.info({ from: this.hostId, to: w.hostId }, "attached to a different host: migrated");
        this.hostId = w.hostId;
        const phase = w.currentPhase ? phaseSignalFrom(w.currentPhase) : undefined;
        this.log.info({ hostId: w.hostId, vmName: w.vmName, phase: phase?.phase, migrationId: phase?.migrationId, attach: this.attachCount }, "welcome");
        const step = onWelcome(this.runtime, phase, this.trySample(), now, this.runtimeOptions);
        await this.apply(step.state, step.effects);
        this.scheduleTick(0);
        break;
      }
      case "phaseEvent": {
        const signal = phaseSignalFrom(msg.value);
        this.log.info({ ...signal }, "phase event");
        const step = onPhaseEvent(this.runtime, signal, this.trySample(), now, this.runtimeOptions);
        await this.apply(step.state, step.effects);
        break;
      }
      case "balloonState":
        this.runtime = onBalloonState(this.runtime, balloonFrom(msg.value));
        // Balloon progress: re-check a waiting PREPARE now, in its own step so this loop keeps reading.
        if (awaitingPrepare(this.runtime)) this.schedulePrepareCheck(0);
        break;
      case "policy":
        this.runtime = onPolicy(this.runtime, policyFrom(msg.value));
        this.log.info({ ...this.runtime.policy }, "policy");
        break;
      default:
        break;
    }
    this.rescheduleIfSooner();
    this.armPrepareCheck();
  }

  private async apply(state: RuntimeState, effects: Effect[]): Promise<void> {
    // State first: even if a send fails, the decision stands and the next attach continues from it.
    this.runtime = state;
    if (!effects.some((e) => e.kind === "zero")) {
      await this.actuator.run(effects);
      return;
    }
    const abort = new AbortController();
    this.zeroAbort = abort;
    try {
      await this.actuator.run(effects, abort.signal);
    } finally {
      if (this.zeroAbort === abort) this.zeroAbort = undefined;
    }
  }

  /** A waiting PREPARE: check again in prepareCheckMs unless a check is already due. */
  private armPrepareCheck(): void {
    if (awaitingPrepare(this.runtime) && !this.prepareTimer) this.schedulePrepareCheck(this.runtimeOptions.prepareCheckMs);
  }

  private schedulePrepareCheck(delayMs: number): void {
    this.clearPrepareCheck();
    if (this.stopped || !this.stream) return;
    const attach = this.attachCount;
    this.prepareTimer = setTimeout(() => {
      this.prepareTimer = undefined;
      void this.enqueue(async () => {
        if (attach !== this.attachCount || !this.stream) return;
        const step = onPrepareCheck(this.runtime, this.trySample(), (this.opts.now ?? Date.now)(), this.runtimeOptions);
        await this.apply(step.state, step.effects);
        this.armPrepareCheck();
      });
    }, delayMs);
  }

  private clearPrepareCheck(): void {
    if (this.prepareTimer) clearTimeout(this.prepareTimer);
    this.prepareTimer = undefined;
  }

  private trySample(): Sample | undefined {
    try {
      return this.opts.collector.collect();
    } catch (err) {
      const message = errorMessage(err);
      const now = Date.now();
      // At 200 ms intervals one broken file would flood the log; repeat a message at most once a minute.
      if (message !== this.lastSampleError.message || now - this.lastSampleError.at > 60_000) {
        this.log.warn({ err: message }, "incomplete sample: refusing to shrink");
        this.lastSampleError = { message, at: now };
      }
      return undefined;
    }
  }

  private async tick(): Promise<void> {
    if (!this.stream) return;
    // Decide on every sample; the state machine says which samples also go to the coordinator (a "report" effect).
    const step = onTick(this.runtime, this.trySample(), this.runtimeOptions);
    await this.apply(step.state, step.effects);
    this.armPrepareCheck();
  }

  private scheduleTick(delayMs: number): void {
    this.clearTick();
    if (this.stopped || !this.stream) return;
    this.tickDueAt = Date.now() + delayMs;
    const attach = this.attachCount;
    this.tickTimer = setTimeout(() => {
      this.tickTimer = undefined;
      void this.enqueue(() => this.tick()).then(() => {
        // A tick that outlived its stream must not start the ticker of the next attach before its Welcome.
        if (!this.tickTimer && attach === this.attachCount) this.scheduleTick(sampleIntervalMs(this.runtime, this.runtimeOptions));
      });
    }, delayMs);
  }

  // Entering post-copy shortens the interval: do not wait out the old, longer one.
  private rescheduleIfSooner(): void {
    if (!this.tickTimer) return;
    const interval = sampleIntervalMs(this.runtime, this.runtimeOptions);
    if (Date.now() + interval < this.tickDueAt) this.scheduleTick(interval);
  }

  private clearTick(): void {
    if (this.tickTimer) clearTimeout(this.tickTimer);
    this.tickTimer = undefined;
  }
}
