// The benchmarks' statistics (bench/stats.ts) and the /proc parsers of bench/agent-cost.ts, as tables.
import { describe, expect, it } from "vitest";
import { guestSnapshotCommand, parseGuestSnapshot, parseProcStat, statusBytes, sumSchedstatNs } from "../../bench/agent-cost.js";
import { mean, median, percentile, percentiles, round, roundSummary, sortedCopy, spread, summarize } from "../../bench/stats.js";

describe("percentile (linear interpolation between closest ranks)", () => {
  const cases: { name: string; values: number[]; p: number; want: number }[] = [
    { name: "single value, any p", values: [7], p: 99, want: 7 },
    { name: "p0 is the minimum", values: [3, 1, 2], p: 0, want: 1 },
    { name: "p100 is the maximum", values: [3, 1, 2], p: 100, want: 3 },
    { name: "p50 of odd count is the middle", values: [5, 1, 3], p: 50, want: 3 },
    { name: "p50 of even count interpolates", values: [1, 2, 3, 4], p: 50, want: 2.5 },
    { name: "p25 of 1..5", values: [1, 2, 3, 4, 5], p: 25, want: 2 },
    { name: "p90 of 1..10", values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], p: 90, want: 9.1 },
    { name: "p99 of 0..100", values: Array.from({ length: 101 }, (_, i) => i), p: 99, want: 99 },
    { name: "p99 of 1..100 interpolates near the top", values: Array.from({ length: 100 }, (_, i) => i + 1), p: 99, want: 99.01 },
    { name: "duplicates", values: [2, 2, 2, 9], p: 50, want: 2 },
    { name: "negative values sort numerically", values: [-10, 5, -1, 0], p: 50, want: -0.5 },
    { name: "numeric, not lexicographic, order", values: [10, 9, 100, 1], p: 100, want: 100 },
  ];
  for (const c of cases) {
    it(c.name, () => {
      expect(percentile(c.values, c.p)).toBeCloseTo(c.want, 9);
    });
  }

  const bad: { name: string; values: number[]; p: number }[] = [
    { name: "empty set", values: [], p: 50 },
    { name: "p below 0", values: [1], p: -1 },
    { name: "p above 100", values: [1], p: 100.5 },
    { name: "p is NaN", values: [1], p: NaN },
    { name: "a NaN value", values: [1, NaN], p: 50 },
    { name: "an infinite value", values: [1, Infinity], p: 50 },
  ];
  for (const c of bad) {
    it(`throws RangeError on ${c.name}`, () => {
      expect(() => percentile(c.values, c.p)).toThrow(RangeError);
    });
  }

  it("percentiles sorts once and answers in the order asked", () => {
    expect(percentiles([4, 1, 3, 2, 5], [100, 0, 50])).toEqual([5, 1, 3]);
  });

  it("never mutates its input", () => {
    const xs = [3, 1, 2];
    percentile(xs, 50);
    sortedCopy(xs);
    summarize(xs);
    expect(xs).toEqual([3, 1, 2]);
  });
});

describe("median, mean, spread", () => {
  const cases: { values: number[]; median: number; mean: number; min: number; max: number }[] = [
    { values: [1], median: 1, mean: 1, min: 1, max: 1 },
    { values: [1, 3], median: 2, mean: 2, min: 1, max: 3 },
    { values: [9, 1, 5], median: 5, mean: 5, min: 1, max: 9 },
    { values: [10, 1, 2, 3], median: 2.5, mean: 4, min: 1, max: 10 },
    { values: [-2, -8, 4], median: -2, mean: -2, min: -8, max: 4 },
  ];
  for (const c of cases) {
    it(`[${c.values.join(", ")}]`, () => {
      expect(median(c.values)).toBe(c.median);
      expect(mean(c.values)).toBe(c.mean);
      expect(spread(c.values)).toEqual({ min: c.min, max: c.max });
    });
  }

  it("throws RangeError on empty sets", () => {
    expect(() => median([])).toThrow(RangeError);
    expect(() => mean([])).toThrow(RangeError);
    expect(() => spread([])).toThrow(RangeError);
  });
});

describe("summarize", () => {
  it("summarizes 1..100", () => {
    const s = summarize(Array.from({ length: 100 }, (_, i) => 100 - i));
    expect(s).toMatchObject({ count: 100, min: 1, max: 100, mean: 50.5, p50: 50.5 });
    expect(s.p90).toBeCloseTo(90.1, 9);
    expect(s.p99).toBeCloseTo(99.01, 9);
  });

  it("gives count 0 and NaN for an empty set", () => {
    const s = summarize([]);
    expect(s.count).toBe(0);
    for (const k of ["min", "max", "mean", "p50", "p90", "p99"] as const) expect(s[k]).toBeNaN();
  });

  it("rounds for reports", () => {
    expect(round(1.23456, 2)).toBe(1.23);
    expect(round(1.235, 0)).toBe(1);
    expect(round(NaN)).toBeNaN();
    expect(roundSummary(summarize([1.23456, 2.34567]), 1)).toEqual({ count: 2, min: 1.2, max: 2.3, mean: 1.8, p50: 1.8, p90: 2.2, p99: 2.3 });
  });
});

describe("agent-cost /proc parsers", () => {
  // Real lines from this kind of host: field 14 utime, 15 stime, 22 starttime.
  const stat =
    "21664 (node) S 21650 21650 17992 0 -1 4194560 12093 0 0 0 187 41 0 0 20 0 11 0 1823011 1203302400 15660 18446744073709551615 1 1 0 0 0 0 0 4096 134234626 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
  const cases: { name: string; text: string; want: { comm: string; utimeTicks: number; stimeTicks: number; startTimeTicks: number } }[] = [
    { name: "plain", text: stat, want: { comm: "node", utimeTicks: 187, stimeTicks: 41, startTimeTicks: 1823011 } },
    {
      name: "comm with spaces and parentheses",
      text: stat.replace("(node)", "(a) b (c)"),
      want: { comm: "a) b (c", utimeTicks: 187, stimeTicks: 41, startTimeTicks: 1823011 },
    },
    { name: "trailing newline", text: `${stat}\n`, want: { comm: "node", utimeTicks: 187, stimeTicks: 41, startTimeTicks: 1823011 } },
  ];
  for (const c of cases) {
    it(`parseProcStat: ${c.name}`, () => {
      expect(parseProcStat(c.text)).toMatchObject(c.want);
    });
  }

  it("parseProcStat rejects what is not a stat line", () => {
    expect(() => parseProcStat("cat: /proc/99/stat: No such file or directory")).toThrow(/stat/);
    expect(() => parseProcStat("1 (x) S 1 2")).toThrow(/utime/);
  });

  const sched: { name: string; text: string; want: number | undefined }[] = [
    { name: "one thread", text: "49611541 10455159 186\n", want: 49611541 },
    { name: "several threads", text: "1000 5 1\n2000 7 2\n30 0 1\n", want: 3030 },
    { name: "noise lines ignored", text: "cat: x: No such file\n1000 5 1\n", want: 1000 },
    { name: "nothing", text: "", want: undefined },
  ];
  for (const c of sched) {
    it(`sumSchedstatNs: ${c.name}`, () => {
      expect(sumSchedstatNs(c.text)).toBe(c.want);
    });
  }

  it("statusBytes reads kB fields", () => {
    const status = "Name:\tnode\nVmHWM:\t   62764 kB\nVmRSS:\t   61440 kB\nThreads:\t11\n";
    expect(statusBytes(status, "VmRSS")).toBe(61440 * 1024);
    expect(statusBytes(status, "VmHWM")).toBe(62764 * 1024);
    expect(statusBytes(status, "VmSwap")).toBeUndefined();
  });

  it("parses a guest snapshot in sections", () => {
    const out = `${stat}\n@@BALLAST_BENCH@@\n1000 5 1\n2000 7 2\n@@BALLAST_BENCH@@\nVmHWM:\t   50000 kB\nVmRSS:\t   40000 kB\n`;
    expect(parseGuestSnapshot(out)).toEqual({
      stat: expect.objectContaining({ utimeTicks: 187, stimeTicks: 41 }),
      schedNs: 3000,
      rssBytes: 40000 * 1024,
      hwmBytes: 50000 * 1024,
    });
    expect(guestSnapshotCommand(42)).toContain("/proc/42/task/*/schedstat");
    expect(guestSnapshotCommand(42)).not.toMatch(/[\r\n]/);
  });
});
