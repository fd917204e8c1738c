/**
 * Small, pure rate limits with an injectable clock: a token bucket for
 * budgets (agent balloon shrinks, agent messages per session) and a log
 * limiter so that input which can flood (refused requests, bad samples)
 * writes at most one line per key per window, with a count of what it
 * suppressed.
 */

/** A token bucket: `burst` tokens, refilled at `perSecond`. */
export class TokenBucket {
  private tokens: number;
  private last: number;

  constructor(
    readonly burst: number,
    readonly perSecond: number,
    now: number,
  ) {
    if (!(burst >= 1) || !(perSecond > 0)) throw new RangeError(`token bucket needs burst >= 1 and perSecond > 0, got ${burst}, ${perSecond}`);
    this.tokens = burst;
    this.last = now;
  }

  /** Takes one token if there is one. */
  take(now: number): boolean {
    this.refill(now);
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Tokens available now (fractional). */
  available(now: number): number {
    this.refill(now);
    return this.tokens;
  }

  private refill(now: number): void {
    if (now > this.last) {
      this.tokens = Math.min(this.burst, this.tokens + ((now - this.last) / 1000) * this.perSecond);
      this.last = now;
    }
  }
}

/** At most one log line per key per `windowMs`; reports how many were suppressed in between. */
export class LogLimiter {
  private readonly seen = new Map<string, { at: number; suppressed: number }>();

  constructor(
    readonly windowMs = 10_000,
    private readonly maxKeys = 1000,
  ) {}

  /** Returns the number suppressed since the last line when this one may be logged, or undefined to stay quiet. */
  admit(key: string, now: number): number | undefined {
    const s = this.seen.get(key);
    if (s && now - s.at < this.windowMs) {
      s.suppressed++;
      return undefined;
    }
    if (!s && this.seen.size >= this.maxKeys) {
      // Bounded memory under hostile keys: forget the oldest.
      const first = this.seen.keys().next().value;
      if (first !== undefined) this.seen.delete(first);
    }
    const suppressed = s?.suppressed ?? 0;
    this.seen.set(key, { at: now, suppressed: 0 });
    return suppressed;
  }
}
