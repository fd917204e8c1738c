import { describe, expect, it } from "vitest";
import { LogLimiter, TokenBucket } from "../../shared/rate-limit.js";

describe("TokenBucket", () => {
  it("allows a burst, then refills at the set rate", () => {
    const b = new TokenBucket(3, 0.5, 0);
    expect([b.take(0), b.take(0), b.take(0), b.take(0)]).toEqual([true, true, true, false]);
    expect(b.take(1999)).toBe(false);
    expect(b.take(2000)).toBe(true);
    expect(b.take(2001)).toBe(false);
  });
  it("never holds more than its burst", () => {
    const b = new TokenBucket(2, 10, 0);
    b.take(0);
    expect(b.available(1_000_000)).toBe(2);
  });
  it("1000 requests in one second from a full bucket get burst + rate", () => {
    const b = new TokenBucket(3, 0.5, 0);
    let ok = 0;
    for (let i = 0; i < 1000; i++) if (b.take(i)) ok++;
    expect(ok).toBe(3);
  });
  it("refuses nonsense settings", () => {
    expect(() => new TokenBucket(0, 1, 0)).toThrow(RangeError);
    expect(() => new TokenBucket(1, 0, 0)).toThrow(RangeError);
  });
});

describe("LogLimiter", () => {
  it("admits one line per key per window and counts the rest", () => {
    const l = new LogLimiter(1000);
    expect(l.admit("a", 0)).toBe(0);
    expect(l.admit("a", 10)).toBeUndefined();
    expect(l.admit("a", 20)).toBeUndefined();
    expect(l.admit("b", 30)).toBe(0);
    expect(l.admit("a", 1000)).toBe(2);
  });
  it("keeps memory bounded under many keys", () => {
    const l = new LogLimiter(1000, 10);
    for (let i = 0; i < 1000; i++) l.admit(`k${i}`, i);
    expect((l as unknown as { seen: Map<string, unknown> }).seen.size).toBeLessThanOrEqual(10);
  });
});
