/**
 * Byte-size helpers. Domain code works in JS numbers (exact up to 8 PiB);
 * the wire uses uint64 as bigint. Conversion happens only at boundaries.
 */

/** One mebibyte. */
export const MiB = 1024 * 1024;
/** One gibibyte. */
export const GiB = 1024 * MiB;

/** bigint from the wire to a number; throws if it cannot be exact. */
export function toNumber(value: bigint): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new RangeError(`value ${value} does not fit a safe integer`);
  }
  return Number(value);
}

/** A non-negative number to a wire uint64; rounds down fractions. */
export function toU64(value: number): bigint {
  if (!Number.isFinite(value) || value < 0) return 0n;
  return BigInt(Math.floor(value));
}

/** Formats bytes as MiB with one decimal, e.g. "512.0 MiB". */
export function formatMiB(bytes: number): string {
  return `${(bytes / MiB).toFixed(1)} MiB`;
}

/**
 * Parses a size such as "512MiB", "1G", "1073741824". Suffixes are binary
 * (K/KiB = 1024). Throws RangeError with the input on anything else.
 */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(b|k|kib|kb|m|mib|mb|g|gib|gb|t|tib|tb)?\s*$/i.exec(text);
  if (!m) throw new RangeError(`not a size: ${JSON.stringify(text)} (examples: 512MiB, 1GiB, 1048576)`);
  const n = Number(m[1]);
  const unit = (m[2] ?? "b").toLowerCase()[0];
  const mult = unit === "k" ? 1024 : unit === "m" ? MiB : unit === "g" ? GiB : unit === "t" ? 1024 * GiB : 1;
  return Math.floor(n * mult);
}
