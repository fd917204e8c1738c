/**
 * Byte-size helpers. Domain code works in JS numbers (exact up to 8 PiB);
 * the wire uses uint64 as bigint. Conversion happens only at boundaries.
 */

/** One kibibyte (2^10). */
export const KiB = 1024;
/** One mebibyte (2^20). */
export const MiB = 1024 * KiB;
/** One gibibyte (2^30). */
export const GiB = 1024 * MiB;
/** One tebibyte (2^40). */
export const TiB = 1024 * GiB;
/** One pebibyte (2^50). */
export const PiB = 1024 * TiB;

/**
 * The largest size {@link parseSize} and the config schemas accept: 1 PiB.
 * Far above any VM's RAM, and well inside the safe-integer range (2^53), so
 * every accepted size is an exact JS number.
 */
export const MAX_SIZE_BYTES = PiB;

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
 * Unit suffixes, lower-cased. SI suffixes (KB, MB, GB, TB, PB) are powers of
 * 1000, as in network rates and disk labels: `125MB` is 125,000,000. IEC
 * suffixes (KiB ... PiB) are powers of 1024. A bare letter (K, M, G, T, P)
 * is binary too, as in QEMU's `-m 512M` and `numfmt --from=iec`.
 */
const UNITS: ReadonlyMap<string, bigint> = new Map([
  ["", 1n],
  ["b", 1n],
  ["k", 1n << 10n],
  ["kib", 1n << 10n],
  ["kb", 10n ** 3n],
  ["m", 1n << 20n],
  ["mib", 1n << 20n],
  ["mb", 10n ** 6n],
  ["g", 1n << 30n],
  ["gib", 1n << 30n],
  ["gb", 10n ** 9n],
  ["t", 1n << 40n],
  ["tib", 1n << 40n],
  ["tb", 10n ** 12n],
  ["p", 1n << 50n],
  ["pib", 1n << 50n],
  ["pb", 10n ** 15n],
]);

const EXAMPLES = "examples: 1048576, 512MiB, 1.5GiB, 125MB";

/**
 * Parses a size such as "512MiB", "125MB", "1G" or "1048576" into bytes.
 *
 * - A bare number is bytes; `B` may be written out.
 * - `KB`/`MB`/`GB`/`TB`/`PB` are powers of 1000 (`125MB` = 125,000,000).
 * - `KiB`/`MiB`/`GiB`/`TiB`/`PiB` and the bare letters `K`/`M`/`G`/`T`/`P`
 *   are powers of 1024 (`1G` = `1GiB` = 1,073,741,824).
 * - Units are case-insensitive; whitespace around the number and the unit is
 *   allowed. A decimal fraction is allowed if the result is a whole number
 *   of bytes (`1.5GiB` yes, `0.1GiB` no): the arithmetic is exact, nothing is
 *   rounded.
 *
 * Throws RangeError, quoting the input, for anything else, for a fraction
 * of a byte, and for results above {@link MAX_SIZE_BYTES} (1 PiB), so every
 * result is a safe integer.
 */
export function parseSize(text: string): number {
  // The length cap keeps the exact bigint arithmetic below cheap.
  const m = text.length > 64 ? null : /^\s*(\d+)(?:\.(\d+))?\s*([A-Za-z]*)\s*$/.exec(text);
  if (!m) throw new RangeError(`not a size: ${JSON.stringify(text.length > 64 ? `${text.slice(0, 40)}...` : text)} (${EXAMPLES})`);
  const [, whole = "", fraction = "", unitText = ""] = m;
  const mult = UNITS.get(unitText.toLowerCase());
  if (mult === undefined) {
    throw new RangeError(
      `not a size: ${JSON.stringify(text)}: unknown unit ${JSON.stringify(unitText)} ` +
        `(B; KB, MB, GB, TB, PB = powers of 1000; KiB, MiB, GiB, TiB, PiB or K, M, G, T, P = powers of 1024)`,
    );
  }
  // Exact: value = (whole.fraction) * mult = digits * mult / 10^fraction.length.
  const scale = 10n ** BigInt(fraction.length);
  const scaled = BigInt(whole + fraction) * mult;
  if (scaled % scale !== 0n) {
    const approx = Number(scaled) / Number(scale);
    throw new RangeError(`${JSON.stringify(text)} is not a whole number of bytes (about ${approx})`);
  }
  const bytes = scaled / scale;
  if (bytes > BigInt(MAX_SIZE_BYTES)) {
    throw new RangeError(`${JSON.stringify(text)} is ${Number(bytes).toPrecision(3)} bytes, above the 1 PiB limit (${MAX_SIZE_BYTES} bytes)`);
  }
  return Number(bytes);
}
