/**
 * The one retry policy of the project, declared once. Every reconnect loop
 * (agent re-attach, the coordinator's hypervisor connection) and every
 * bounded retry (final stats, a peer that is not ready yet) takes its delays
 * from here, built on cockatiel's exponential backoff with decorrelated
 * jitter, so there is no hand-written backoff formula anywhere else.
 */
import { setTimeout as delay } from "node:timers/promises";
import { ExponentialBackoff, handleAll, retry, type IBackoff, type RetryPolicy } from "cockatiel";

/** Backoff settings; all in milliseconds. */
export interface BackoffSettings {
  /** First delay. */
  initialMs: number;
  /** Upper bound of any delay. */
  maxMs: number;
}

/**
 * The named backoffs, with their documented defaults:
 * - `reconnect`: a long-lived connection that dropped (QMP, libvirt, the
 *   agent's session): 100 ms, growing to 5 s, so a dead peer costs little
 *   and a restarted one is found within about 5 s.
 * - `attach`: the agent re-attaching after a live migration: 100 ms growing
 *   to 2 s, because the guest must reach the destination's coordinator while
 *   post-copy is still running.
 * - `poll`: a bounded retry of a read that is not ready yet (final
 *   `query-migrate`, a peer's final numbers): 200 ms growing to 1 s.
 */
export const BACKOFF = {
  reconnect: { initialMs: 100, maxMs: 5000 },
  attach: { initialMs: 100, maxMs: 2000 },
  poll: { initialMs: 200, maxMs: 1000 },
} as const satisfies Record<string, BackoffSettings>;

/**
 * A stateful sequence of delays for a reconnect loop: `next()` gives the
 * delay before the next attempt, `reset()` starts over after a success.
 */
export class Backoff {
  private readonly factory: ExponentialBackoff<unknown>;
  private current: IBackoff<unknown> | undefined;
  private attemptsValue = 0;

  constructor(readonly settings: BackoffSettings) {
    if (!(settings.initialMs > 0) || !(settings.maxMs >= settings.initialMs)) {
      throw new RangeError(`backoff needs 0 < initialMs <= maxMs, got ${JSON.stringify(settings)}`);
    }
    this.factory = new ExponentialBackoff({ initialDelay: settings.initialMs, maxDelay: settings.maxMs });
  }

  /** Failed attempts since the last reset. */
  get attempts(): number {
    return this.attemptsValue;
  }

  /** The delay before the next attempt, in [0, maxMs]. */
  next(): number {
    this.current = this.current ? this.current.next(undefined) : this.factory.next();
    this.attemptsValue++;
    return Math.min(this.settings.maxMs, Math.max(0, Math.round(this.current.duration)));
  }

  /** Call after a success: the next failure starts from the first delay again. */
  reset(): void {
    this.current = undefined;
    this.attemptsValue = 0;
  }
}

/** A bounded retry policy: `maxAttempts` retries after the first try, delays from `settings`. */
export function retryPolicy(settings: BackoffSettings, maxAttempts: number): RetryPolicy {
  return retry(handleAll, { maxAttempts, backoff: new ExponentialBackoff({ initialDelay: settings.initialMs, maxDelay: settings.maxMs }) });
}

/** Sleeps `ms`, rejecting with the signal's reason on abort. */
export async function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  try {
    await delay(ms, undefined, { signal });
  } catch (err) {
    throw signal?.aborted ? signal.reason : err;
  }
}

/**
 * Settles like `promise`, or rejects with `onTimeout()` after `ms`. The one
 * timeout race of the project; the timer never outlives the promise.
 */
export async function withTimeout<T>(promise: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  const ac = new AbortController();
  try {
    return await Promise.race([
      promise,
      delay(ms, undefined, { signal: ac.signal }).then(() => {
        throw onTimeout();
      }),
    ]);
  } finally {
    ac.abort();
  }
}
