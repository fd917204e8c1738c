/**
 * Applies balloon targets to one VM: clamps them into the VM's allowed
 * range, rate-limits agent-driven changes, and waits for the guest driver
 * to actually get there.
 *
 * Targets are the guest's memory size (QMP `balloon` semantics), not the
 * balloon's size: a lower target means a bigger balloon.
 */
import { EventEmitter } from "node:events";
import { DeadlineError, FailedPreconditionError, InvalidArgumentError, UnavailableError, errorMessage } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { sleep } from "../shared/retry.js";
import { MiB } from "../shared/units.js";

/** Options for {@link BalloonController}. */
export interface BalloonControllerOptions {
  /** Lowest target ever applied. Must be > 0: QEMU rejects a balloon target of 0. */
  floorBytes: number;
  /** Highest target ever applied, normally the RAM size. */
  maxBytes: number;
  /** Rate limit of non-forced requests; default 1000 ms. */
  minIntervalMs?: number;
  /** query-balloon poll period while waiting; default 250 ms. */
  pollIntervalMs?: number;
  /** |actual - target| at or below this counts as reached; default 8 MiB. */
  toleranceBytes?: number;
  /** No progress toward the target for this long means stalled; default 4000 ms. */
  stallMs?: number;
  /** Defaults to a silent logger. */
  logger?: Logger;
}

/** Outcome of {@link BalloonController.waitForTarget}. */
export interface BalloonWaitResult {
  /** Last actual seen; NaN if QEMU never answered during the wait and nothing was known before. */
  actualBytes: number;
  /** Target in force when the wait ended (it may change during the wait). */
  targetBytes: number;
  /** Within tolerance of the target. */
  reached: boolean;
  /** No step closer to the target for `stallMs`. May be true together with `timedOut`. */
  stalled: boolean;
  /** The wait's time budget ran out. */
  timedOut: boolean;
  /** Wall time the wait took. */
  elapsedMs: number;
}

/** Payload of the `state` event. Either side is undefined until first known. */
export interface BalloonState {
  targetBytes: number | undefined;
  actualBytes: number | undefined;
}

/**
 * What the controller needs from the hypervisor driver (coordinator/hypervisor.ts).
 * A structural subset so tests can pass a small fake. The driver's
 * `balloon-change` events reach the controller through {@link BalloonController.learnActual}.
 */
export interface BalloonDevice {
  setBalloon(targetBytes: number): Promise<void>;
  queryBalloon(): Promise<number>;
}

interface Waiter {
  resolve: (applied: number) => void;
  reject: (err: Error) => void;
}

interface Scheduled {
  timer: NodeJS.Timeout;
  bytes: number;
  reason: string | undefined;
  waiters: Waiter[];
}

/**
 * Balloon target controller for one VM. Emits `state` ({@link BalloonState})
 * whenever it sets a target or learns a different actual size.
 */
export class BalloonController extends EventEmitter {
  /** Lower clamp bound. */
  readonly floorBytes: number;
  /** Upper clamp bound. */
  readonly maxBytes: number;
  private readonly device: BalloonDevice;
  private readonly minIntervalMs: number;
  private readonly pollIntervalMs: number;
  private readonly toleranceBytes: number;
  private readonly stallMs: number;
  private readonly log: Logger;
  private target: number | undefined;
  private actual: number | undefined;
  private lastApplyAt = Number.NEGATIVE_INFINITY;
  private scheduled: Scheduled | undefined;
  private disposed = false;

  /** Throws InvalidArgumentError on bad bounds or options. */
  constructor(device: BalloonDevice, options: BalloonControllerOptions) {
    super();
    const floor = requireBytes(options.floorBytes, "floorBytes");
    const max = requireBytes(options.maxBytes, "maxBytes");
    if (floor <= 0) throw new InvalidArgumentError(`balloon floorBytes must be > 0 (QEMU rejects a balloon target of 0), got ${floor}`);
    if (floor > max) throw new InvalidArgumentError(`balloon floorBytes (${floor}) is above maxBytes (${max})`);
    this.floorBytes = Math.floor(floor);
    this.maxBytes = Math.floor(max);
    this.device = device;
    this.minIntervalMs = optionalMs(options.minIntervalMs, 1000, "minIntervalMs", true);
    this.pollIntervalMs = optionalMs(options.pollIntervalMs, 250, "pollIntervalMs", false);
    this.stallMs = optionalMs(options.stallMs, 4000, "stallMs", false);
    this.toleranceBytes = options.toleranceBytes === undefined ? 8 * MiB : requireBytes(options.toleranceBytes, "toleranceBytes");
    this.log = (options.logger ?? silentLogger()).child({ component: "balloon" });
  }

  /** Last target successfully applied through this controller. */
  get targetBytes(): number | undefined {
    return this.target;
  }

  /** Last actual size learned from query-balloon or BALLOON_CHANGE. */
  get actualBytes(): number | undefined {
    return this.actual;
  }

  /** Clamps into [floorBytes, maxBytes], rounding down to whole bytes. Throws InvalidArgumentError if non-finite or negative. */
  clamp(bytes: number): number {
    requireBytes(bytes, "target");
    return Math.min(this.maxBytes, Math.max(this.floorBytes, Math.floor(bytes)));
  }

  /**
   * Clamps and applies a target; resolves with the applied value.
   *
   * Non-forced requests within `minIntervalMs` of the last apply are
   * coalesced: the latest one is applied when the interval ends and every
   * coalesced caller resolves with that value, because only the newest
   * estimate of the guest's need matters. `force` (PREPARE, restore) applies
   * at once and supersedes anything scheduled; superseded callers resolve
   * with the forced value. `minIntervalMs` overrides the controller's
   * interval for this call (agent grows use a shorter one than shrinks).
   */
  async setTarget(bytes: number, opts?: { force?: boolean; reason?: string; minIntervalMs?: number }): Promise<number> {
    if (this.disposed) throw new FailedPreconditionError("balloon controller is disposed");
    const clamped = this.clamp(bytes);
    const reason = opts?.reason;

    if (opts?.force) {
      const superseded = this.takeScheduled();
      try {
        await this.apply(clamped, reason, true);
      } catch (err) {
        for (const w of superseded) w.reject(err as Error);
        throw err;
      }
      for (const w of superseded) w.resolve(clamped);
      return clamped;
    }

    const now = performance.now();
    const interval = opts?.minIntervalMs ?? this.minIntervalMs;
    if (!this.scheduled && now - this.lastApplyAt >= interval) {
      await this.apply(clamped, reason, false);
      return clamped;
    }
    return new Promise<number>((resolve, reject) => {
      if (this.scheduled) {
        this.scheduled.bytes = clamped;
        this.scheduled.reason = reason;
        this.scheduled.waiters.push({ resolve, reject });
        return;
      }
      const delay = Math.max(0, this.lastApplyAt + interval - now);
      const timer = setTimeout(() => this.runScheduled(), delay);
      this.scheduled = { timer, bytes: clamped, reason, waiters: [{ resolve, reject }] };
      this.log.debug({ targetBytes: clamped, delayMs: Math.round(delay), reason }, "balloon target coalesced");
    });
  }

  /**
   * Polls query-balloon until the actual size is within tolerance of the
   * target, no progress was made for `stallMs`, or `deadlineMs` (a duration
   * from now, not a timestamp) ran out. Never throws for those outcomes; it
   * reports them. Throws the signal's reason on abort, FailedPreconditionError
   * if no target was ever set or the controller is disposed, and QMP errors
   * other than disconnects/timeouts (which it rides out, since QMP reconnects).
   * `onProgress` gets every newly observed actual size.
   */
  async waitForTarget(opts: { deadlineMs: number; signal?: AbortSignal; onProgress?: (actual: number) => void }): Promise<BalloonWaitResult> {
    const deadlineMs = opts.deadlineMs;
    if (typeof deadlineMs !== "number" || Number.isNaN(deadlineMs) || deadlineMs < 0) {
      throw new InvalidArgumentError(`waitForTarget: deadlineMs must be a duration >= 0, got ${String(deadlineMs)}`);
    }
    if (this.target === undefined) throw new FailedPreconditionError("waitForTarget: no balloon target has been set");
    const { signal, onProgress } = opts;
    const start = performance.now();
    let watchedTarget = this.target;
    let bestDistance = Number.POSITIVE_INFINITY;
    let lastProgressAt = start;
    let lastReported: number | undefined;

    for (;;) {
      signal?.throwIfAborted();
      if (this.disposed) throw new FailedPreconditionError("balloon controller disposed during waitForTarget");
      try {
        await this.refresh();
      } catch (err) {
        if (!(err instanceof UnavailableError || err instanceof DeadlineError)) throw err;
        this.log.warn({ err: errorMessage(err) }, "query-balloon failed while waiting; will retry");
      }
      signal?.throwIfAborted();
      const now = performance.now();
      const target = this.target;
      if (target !== watchedTarget) {
        // A new target restarts progress tracking: distance to the old one means nothing.
        watchedTarget = target;
        bestDistance = Number.POSITIVE_INFINITY;
        lastProgressAt = now;
      }
      const actual = this.actual;
      if (actual !== undefined) {
        if (actual !== lastReported) {
          lastReported = actual;
          onProgress?.(actual);
        }
        // Progress means a new closest approach: deflate-on-oom makes the balloon oscillate near its limit, which must count as stalled.
        const distance = Math.abs(actual - target);
        if (distance < bestDistance) {
          bestDistance = distance;
          lastProgressAt = now;
        }
        if (distance <= this.toleranceBytes) {
          return { actualBytes: actual, targetBytes: target, reached: true, stalled: false, timedOut: false, elapsedMs: now - start };
        }
      }
      const elapsed = now - start;
      const stalled = now - lastProgressAt >= this.stallMs;
      const timedOut = elapsed >= deadlineMs;
      if (stalled || timedOut) {
        const result = { actualBytes: actual ?? Number.NaN, targetBytes: target, reached: false, stalled, timedOut, elapsedMs: elapsed };
        this.log.info(result, "balloon target not reached");
        return result;
      }
      const wait = Math.min(this.pollIntervalMs, deadlineMs - elapsed, this.stallMs - (now - lastProgressAt));
      await sleep(Math.max(1, wait), signal);
    }
  }

  /** Runs query-balloon now and records the answer. */
  async refresh(): Promise<number> {
    const actual = await this.device.queryBalloon();
    if (!this.disposed) this.learnActual(actual);
    return actual;
  }

  /** Cancels a scheduled coalesced request (its callers reject with FailedPreconditionError) and stops listening to QMP. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const w of this.takeScheduled()) w.reject(new FailedPreconditionError("balloon controller disposed before the coalesced target was applied"));
  }

  private async apply(bytes: number, reason: string | undefined, force: boolean): Promise<void> {
    // Stamped at issue, not completion, so requests arriving while this one is in flight are coalesced.
    this.lastApplyAt = performance.now();
    this.log.info({ targetBytes: bytes, reason, force }, "balloon target");
    await this.device.setBalloon(bytes);
    this.target = bytes;
    this.emitState();
  }

  private runScheduled(): void {
    const s = this.scheduled;
    if (!s) return;
    this.scheduled = undefined;
    this.apply(s.bytes, s.reason, false).then(
      () => {
        for (const w of s.waiters) w.resolve(s.bytes);
      },
      (err: unknown) => {
        for (const w of s.waiters) w.reject(err instanceof Error ? err : new Error(String(err)));
      },
    );
  }

  private takeScheduled(): Waiter[] {
    const s = this.scheduled;
    if (!s) return [];
    clearTimeout(s.timer);
    this.scheduled = undefined;
    return s.waiters;
  }

  /**
   * Records an actual size reported by the hypervisor (BALLOON_CHANGE, which
   * QEMU throttles to about 1/s, so it complements polling).
   */
  learnActual(actual: number): void {
    if (this.disposed || !Number.isSafeInteger(actual) || actual < 0 || actual === this.actual) return;
    this.actual = actual;
    this.emitState();
  }

  private emitState(): void {
    const state: BalloonState = { targetBytes: this.target, actualBytes: this.actual };
    this.emit("state", state);
  }
}

function requireBytes(v: number, name: string): number {
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0) {
    throw new InvalidArgumentError(`balloon ${name} must be a finite, non-negative number of bytes, got ${String(v)}`);
  }
  return v;
}

function optionalMs(v: number | undefined, fallback: number, name: string, zeroOk: boolean): number {
  if (v === undefined) return fallback;
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || (!zeroOk && v === 0)) {
    throw new InvalidArgumentError(`balloon ${name} must be a ${zeroOk ? "non-negative" : "positive"} number of ms, got ${String(v)}`);
  }
  return v;
}
