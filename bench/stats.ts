/**
 * Pure statistics for the benchmarks: the one place where percentiles are
 * defined, so every bench (fan-out, agent cost, migration matrix) reports
 * the same thing under the same name.
 *
 * Percentiles use linear interpolation between closest ranks (Hyndman & Fan
 * type 7, the default of numpy and R): percentile(xs, 50) equals median(xs),
 * percentile(xs, 0) the minimum and percentile(xs, 100) the maximum.
 *
 * Inputs are never mutated. NaN or infinite values are rejected (a NaN would
 * silently sort anywhere and corrupt every rank).
 */

/** The usual summary of a set of measurements. */
export interface Summary {
  count: number;
  min: number;
  max: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
}

/** Smallest and largest value: the spread of a few repeated runs. */
export interface Spread {
  min: number;
  max: number;
}

function checked(values: readonly number[], what: string): void {
  for (const v of values) {
    if (!Number.isFinite(v)) throw new RangeError(`${what}: not a finite number: ${String(v)}`);
  }
}

/** An ascending copy; throws RangeError on NaN or infinities. */
export function sortedCopy(values: readonly number[]): number[] {
  checked(values, "sortedCopy");
  // Float64Array sorts numerically (and fast) without a comparator.
  return Array.from(Float64Array.from(values).sort());
}

/** Percentile `p` (0..100) of an already ascending array; no checks, no copy. */
export function percentileOfSorted(sorted: readonly number[], p: number): number {
  const n = sorted.length;
  if (n === 0) throw new RangeError("percentile of an empty set");
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile must be in [0, 100], got ${p}`);
  const rank = (p / 100) * (n - 1);
  const lo = Math.floor(rank);
  const hi = Math.ceil(rank);
  const a = sorted[lo] as number;
  const b = sorted[hi] as number;
  return lo === hi ? a : a + (b - a) * (rank - lo);
}

/** Percentile `p` (0..100) of `values`. Throws RangeError on an empty set or p outside [0, 100]. */
export function percentile(values: readonly number[], p: number): number {
  return percentileOfSorted(sortedCopy(values), p);
}

/** Several percentiles with one sort, in the order asked. */
export function percentiles(values: readonly number[], ps: readonly number[]): number[] {
  const sorted = sortedCopy(values);
  return ps.map((p) => percentileOfSorted(sorted, p));
}

/** The median (mean of the two middle values for an even count). Throws RangeError on an empty set. */
export function median(values: readonly number[]): number {
  return percentile(values, 50);
}

/** Arithmetic mean. Throws RangeError on an empty set. */
export function mean(values: readonly number[]): number {
  if (values.length === 0) throw new RangeError("mean of an empty set");
  checked(values, "mean");
  let sum = 0;
  for (const v of values) sum += v;
  return sum / values.length;
}

/** Minimum and maximum. Throws RangeError on an empty set. */
export function spread(values: readonly number[]): Spread {
  if (values.length === 0) throw new RangeError("spread of an empty set");
  checked(values, "spread");
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  return { min, max };
}

/**
 * count, min, max, mean, p50, p90, p99. An empty set gives count 0 and NaN
 * everywhere else (JSON.stringify prints those as null), so a report can
 * always be built; check `count` before comparing against a target.
 */
export function summarize(values: readonly number[]): Summary {
  if (values.length === 0) return { count: 0, min: NaN, max: NaN, mean: NaN, p50: NaN, p90: NaN, p99: NaN };
  const sorted = sortedCopy(values);
  return {
    count: sorted.length,
    min: sorted[0] as number,
    max: sorted[sorted.length - 1] as number,
    mean: mean(sorted),
    p50: percentileOfSorted(sorted, 50),
    p90: percentileOfSorted(sorted, 90),
    p99: percentileOfSorted(sorted, 99),
  };
}

/** Rounds to `digits` decimals for reports (NaN stays NaN). */
export function round(value: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** A summary with every number rounded for display. */
export function roundSummary(s: Summary, digits = 2): Summary {
  return {
    count: s.count,
    min: round(s.min, digits),
    max: round(s.max, digits),
    mean: round(s.mean, digits),
    p50: round(s.p50, digits),
    p90: round(s.p90, digits),
    p99: round(s.p99, digits),
  };
}
