/**
 * The gRPC session with the host coordinator (AgentService.Session): Hello
 * first, then a sample every interval (decided on locally; reported to the
 * coordinator every few seconds or when something changed, see
 * runtime.reportDue), balloon requests and phase acks from the state
 * machine; keepalive, and re-attach with the project's one backoff
 * (shared/retry.ts `BACKOFF.attach`) whenever the stream breaks.
 *
 * The transport is the connector's business (agent/channel.ts): a
 * virtio-serial port with HTTP/2 over it (connect-node), or TCP with grpc-js.
 * The session logic here is the same for both.
 *
 * Why keepalive matters: after a live migration the guest's TCP connection is
 * dead on the destination and a receive-only stream never notices. With a
 * ~2 s keepalive the call fails with UNAVAILABLE about 1.5 s after resume; the
 * re-attach then reaches the DESTINATION's coordinator at the same address,
 * whose Welcome (new host_id, current_phase e.g. POSTCOPY_ACTIVE) tells the
 * agent where it is.
 *
 * Why one stuck step cannot silence the agent: message handling and ticks
 * are serialized (both read and write the runtime state), but every step runs
 * under a deadline; a step that overruns it (a write that never completes,
 * anything else that never settles) is abandoned, its stream is cancelled and
 * the agent re-attaches. The ticker starts with the Welcome, before the
 * Welcome's own effects run, and is re-armed after every tick whatever the
 * tick did. Every step belongs to the attach it was made for: a late step of
 * an old stream never writes on the next one, nor touches its ticker. A log
 * line that cannot be written (pino throws when stdout fails) never stops a
 * request or an ack.
 */
import * as grpc from "@grpc/grpc-js";
import { AgentService, type SessionResponse } from "../gen/ballast/v1/agent_pb.js";
import { createClient, type BidiStream } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { silentLogger } from "../shared/logger.js";
import { errorMessage } from "../shared/errors.js";
import { BACKOFF, Backoff, sleep, type BackoffSettings } from "../shared/retry.js";
import { Actuator, type PageCacheReclaimer } from "./act.js";
import { DeadlineError, withDeadline } from "./deadline.js";
import {
  DEFAULT_RUNTIME_OPTIONS,
  initialState,
  onBalloonState,
  onPhaseEvent,
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

/** gRPC channel options for the agent: keepalive as the rig measured, fast reconnects. */
export const AGENT_CHANNEL_OPTIONS: grpc.ChannelOptions = Object.freeze({
  "grpc.keepalive_time_ms": 2000,
  "grpc.keepalive_timeout_ms": 1000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2000,
});

/** The client side of one AgentService.Session call. */
export type SessionStream = BidiStream<SessionRequestInit, SessionResponse>;

/** One open Session call and the channel it runs on. */
export interface SessionConnection {
  stream: SessionStream;
  /** Releases the channel. */
  close(): void;
}

/**
 * Opens one Session call to `coordinator` with these channel options. May
 * throw when there is nothing to open (then the attach counts as failed and
 * backs off). agent/channel.ts has the virtio-serial connector.
 */
export type SessionConnector = (coordinator: string, channelOptions: grpc.ChannelOptions) => SessionConnection;

/** The real connector: a grpc-js channel per attach. */
export const grpcConnector: SessionConnector = (coordinator, channelOptions) => {
  const client = createClient(AgentService, coordinator, grpc.credentials.createInsecure(), channelOptions);
  return { stream: client.session(), close: () => client.close() };
};

/** Options for {@link AgentSession}. */
export interface AgentSessionOptions {
  /** Coordinator address, host:port, for the TCP connector; with another connector (the virtio-serial port) only a label for logs. */
  coordinator: string;
  /** Hello.vm_id. */
  vmId: string;
  collector: Collector;
  /** Null disables page-cache reclaim. Default: none (the caller decides). */
  reclaimer?: PageCacheReclaimer | null;
  /** State machine and policy tuning. Default {@link DEFAULT_RUNTIME_OPTIONS}. */
  runtime?: RuntimeOptions;
  /** Re-attach backoff. Default `BACKOFF.attach` from shared/retry.ts (100 ms growing to 2 s). */
  backoff?: BackoffSettings;
  /** Give up an attach that has no Welcome after this long. Default 10000 ms. */
  welcomeTimeoutMs?: number;
  /**
   * Deadline of one step (the handling of one message, or one tick, sends
   * included); a message's step also gets `runtime.maxReclaimMs` on top for
   * a PREPARE's reclaim. A step past it is abandoned and the stream
   * cancelled, so the agent re-attaches. Default 5000 ms: writes normally
   * complete at once (grpc-js buffers them).
   */
  stepTimeoutMs?: number;
  /** Extra channel options, merged over {@link AGENT_CHANNEL_OPTIONS}. */
  channelOptions?: grpc.ChannelOptions;
  logger?: Logger;
  /** Wall clock (Unix ms), for PREPARE deadlines. Default Date.now. */
  now?: () => number;
  /** Opens the Session call. Default {@link grpcConnector}; tests wrap it. */
  connect?: SessionConnector;
}

const LOG_LEVELS = new Set(["trace", "debug", "info", "warn", "error", "fatal"]);

/**
 * The logger with its level methods made unable to throw. pino writes
 * synchronously and throws when the write fails (ENOSPC, EIO on stdout):
 * that must never skip the balloon request or ack that follows a log line.
 */
function neverThrowing(log: Logger): Logger {
  return new Proxy(log, {
    get(target, prop, receiver) {
      const value: unknown = Reflect.get(target, prop, receiver);
      if (typeof prop !== "string" || !LOG_LEVELS.has(prop) || typeof value !== "function") return value;
      return (...args: unknown[]) => {
        try {
          return (value as (...a: unknown[]) => unknown).apply(target, args);
        } catch {
          return undefined;
        }
      };
    },
  });
}

/** One attach: its stream, its ticker, and whether it is over. */
class Attach {
  ended = false;
  welcomed = false;
  tickTimer: NodeJS.Timeout | undefined;
  /** performance.now() when the armed tick is due. */
  tickDueAt = 0;
  readonly actuator: Actuator;

  constructor(
    readonly id: number,
    readonly stream: SessionStream,
    reclaimer: PageCacheReclaimer | null,
    logger: Logger,
  ) {
    this.actuator = new Actuator({ send: (request) => this.send(request), reclaimer, logger });
  }

  /** Writes on this attach's stream; never on a later one. */
  send(request: SessionRequestInit): Promise<void> {
    if (this.ended) return Promise.reject(new Error(`attach ${this.id} is over`));
    return this.stream.send(request);
  }

  clearTick(): void {
    if (this.tickTimer) clearTimeout(this.tickTimer);
    this.tickTimer = undefined;
  }

  /** Ends the attach: cancels the stream (the read loop then ends) and its ticker. Idempotent. */
  end(): void {
    this.clearTick();
    if (this.ended) return;
    this.ended = true;
    this.stream.cancel();
  }
}

/** The session client. `start()` runs until `stop()`. */
export class AgentSession {
  private readonly opts: AgentSessionOptions;
  private readonly runtimeOptions: RuntimeOptions;
  private readonly log: Logger;
  private readonly stepTimeoutMs: number;
  private runtime: RuntimeState = initialState();
  private stopped = true;
  /** Aborted by stop(): cuts the backoff pause short. */
  private stopping = new AbortController();
  private loopDone: Promise<void> = Promise.resolve();
  private current: Attach | undefined;
  private chain: Promise<void> = Promise.resolve();
  private lastSampleError = { message: "", at: 0 };
  private hostId = "";
  private attachCount = 0;

  constructor(options: AgentSessionOptions) {
    this.opts = options;
    this.runtimeOptions = options.runtime ?? DEFAULT_RUNTIME_OPTIONS;
    this.log = neverThrowing(options.logger ?? silentLogger());
    this.stepTimeoutMs = options.stepTimeoutMs ?? 5000;
    if (!(this.stepTimeoutMs > 0)) throw new RangeError(`stepTimeoutMs must be > 0, got ${this.stepTimeoutMs}`);
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
    this.stopping = new AbortController();
    this.loopDone = this.loop().catch((err: unknown) => this.log.error({ err: errorMessage(err) }, "session loop crashed"));
  }

  /** Stops: cancels the stream and timers, and waits for the loop to end. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.stopping.abort();
    this.current?.end();
    await this.loopDone;
    await this.chain;
  }

  private async loop(): Promise<void> {
    const backoff = new Backoff(this.opts.backoff ?? BACKOFF.attach);
    let failures = 0;
    while (!this.stopped) {
      const welcomed = await this.attachOnce(failures > 0);
      if (this.stopped) break;
      // A session that got as far as a Welcome worked: the next failure starts again from the first delay.
      if (welcomed) {
        failures = 0;
        backoff.reset();
      } else {
        failures++;
      }
      const delayMs = backoff.next();
      this.log[failures <= 1 ? "info" : "debug"]({ delayMs, failures }, "re-attaching after backoff");
      try {
        await sleep(delayMs, this.stopping.signal);
      } catch {
        // stop() cut the pause short.
      }
    }
  }

  /**
   * One attach: returns whether a Welcome arrived (resets the backoff).
   * `retrying` keeps a long coordinator outage from filling the guest's journal: only the first failure warns.
   */
  private async attachOnce(retrying: boolean): Promise<boolean> {
    let connection: SessionConnection;
    try {
      connection = (this.opts.connect ?? grpcConnector)(this.opts.coordinator, { ...AGENT_CHANNEL_OPTIONS, ...this.opts.channelOptions });
    } catch (err) {
      // No channel to open (the port is not there yet, the device failed): an attach that failed, backed off like any other.
      if (!this.stopped) this.log[retrying ? "debug" : "warn"]({ err: errorMessage(err) }, "cannot open the agent channel");
      return false;
    }
    const attach = new Attach(++this.attachCount, connection.stream, this.opts.reclaimer ?? null, this.log);
    this.current = attach;
    const welcomeTimer = setTimeout(() => {
      if (!attach.welcomed) {
        this.log.warn({ coordinator: this.opts.coordinator }, "no Welcome in time: re-attaching");
        attach.end();
      }
    }, this.opts.welcomeTimeoutMs ?? 10_000);
    try {
      await withDeadline(attach.send({ msg: { case: "hello", value: this.hello() } }), this.stepTimeoutMs, "hello");
      for await (const response of attach.stream) {
        if (response.msg.case === "welcome") attach.welcomed = true;
        await this.enqueue(attach, response.msg.case ?? "empty message", () => this.handle(attach, response), this.runtimeOptions.maxReclaimMs);
      }
      if (!this.stopped) this.log.warn({}, "coordinator ended the session");
    } catch (err) {
      if (!this.stopped) this.log[retrying ? "debug" : "warn"]({ err: errorMessage(err), code: (err as { code?: number }).code }, "session stream failed");
    } finally {
      clearTimeout(welcomeTimer);
      attach.end();
      if (this.current === attach) this.current = undefined;
      connection.close();
    }
    return attach.welcomed;
  }

  private hello() {
    const capabilities = ["postcopy-demand"];
    if (this.opts.collector.hasPsi()) capabilities.push("psi");
    const method = this.opts.reclaimer && this.runtimeOptions.dropCaches ? this.opts.reclaimer.method() : "none";
    if (method === "memory.reclaim") capabilities.push("memory-reclaim");
    if (method === "drop_caches") capabilities.push("drop-caches");
    return { vmId: this.opts.vmId, agentVersion: AGENT_VERSION, capabilities, bootId: this.opts.collector.bootId() };
  }

  /**
   * Serializes message handling and ticks (both read and write the runtime
   * state), each step under its deadline. Never rejects. A step of an attach
   * that is over does nothing: the next attach starts from its own Welcome.
   */
  private enqueue(attach: Attach, what: string, work: () => Promise<void>, extraMs = 0): Promise<void> {
    const run = this.chain.then(() => this.runStep(attach, what, work, extraMs));
    this.chain = run;
    return run;
  }

  private async runStep(attach: Attach, what: string, work: () => Promise<void>, extraMs: number): Promise<void> {
    if (attach.ended) return;
    const ms = this.stepTimeoutMs + extraMs;
    try {
      await withDeadline(work(), ms, `session step "${what}"`);
    } catch (err) {
      if (err instanceof DeadlineError) {
        // Most likely a write the transport never completed: this stream is no good, start a new one.
        this.log.error({ step: what, deadlineMs: ms, attach: attach.id }, "session step stuck: abandoning it and re-attaching");
        attach.end();
      } else {
        this.log.warn({ err: errorMessage(err), step: what }, "session step failed");
      }
    }
  }

  private async handle(attach: Attach, response: SessionResponse): Promise<void> {
    const now = (this.opts.now ?? Date.now)();
    const msg = response.msg;
    switch (msg.case) {
      case "welcome": {
        const w = msg.value;
        if (this.hostId && w.hostId !== this.hostId) this.log.info({ from: this.hostId, to: w.hostId }, "attached to a different host: migrated");
        this.hostId = w.hostId;
        const phase = w.currentPhase ? phaseSignalFrom(w.currentPhase) : undefined;
        this.log.info({ hostId: w.hostId, vmName: w.vmName, phase: phase?.phase, migrationId: phase?.migrationId, attach: attach.id }, "welcome");
        const step = onWelcome(this.runtime, phase, this.trySample(), now, this.runtimeOptions);
        // Sampling starts with the Welcome, before its effects: if they fail, the ticker must still run.
        this.scheduleTick(attach, 0);
        await this.apply(attach, step.state, step.effects);
        break;
      }
      case "phaseEvent": {
        const signal = phaseSignalFrom(msg.value);
        this.log.info({ ...signal }, "phase event");
        const step = onPhaseEvent(this.runtime, signal, this.trySample(), now, this.runtimeOptions);
        await this.apply(attach, step.state, step.effects);
        break;
      }
      case "balloonState":
        this.runtime = onBalloonState(this.runtime, balloonFrom(msg.value));
        break;
      case "policy":
        this.runtime = onPolicy(this.runtime, policyFrom(msg.value));
        this.log.info({ ...this.runtime.policy }, "policy");
        break;
      default:
        break;
    }
    this.rescheduleIfSooner(attach);
  }

  private async apply(attach: Attach, state: RuntimeState, effects: Effect[]): Promise<void> {
    // State first: even if a send fails, the decision stands and the next attach continues from it.
    this.runtime = state;
    await attach.actuator.run(effects);
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

  private async tick(attach: Attach): Promise<void> {
    // Decide on every sample; the state machine says which samples also go to the coordinator (a "report" effect).
    const step = onTick(this.runtime, this.trySample(), this.runtimeOptions);
    await this.apply(attach, step.state, step.effects);
  }

  private scheduleTick(attach: Attach, delayMs: number): void {
    attach.clearTick();
    if (this.stopped || attach.ended) return;
    attach.tickDueAt = performance.now() + delayMs;
    attach.tickTimer = setTimeout(() => {
      attach.tickTimer = undefined;
      void this.enqueue(attach, "tick", () => this.tick(attach)).finally(() => {
        // Re-armed whatever the tick did (failed, or abandoned at its deadline), unless something re-armed it meanwhile.
        if (!attach.tickTimer) this.scheduleTick(attach, sampleIntervalMs(this.runtime, this.runtimeOptions));
      });
    }, delayMs);
  }

  // Entering post-copy shortens the interval: do not wait out the old, longer one.
  private rescheduleIfSooner(attach: Attach): void {
    if (!attach.tickTimer) return;
    const interval = sampleIntervalMs(this.runtime, this.runtimeOptions);
    if (performance.now() + interval < attach.tickDueAt) this.scheduleTick(attach, interval);
  }
}
