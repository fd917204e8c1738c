/**
 * Parsers for the kernel's memory text files. Pure functions on strings, so
 * they are tested on real captures; reading the files is sample.ts's job.
 *
 * Every result is in bytes (JS numbers). Every failure is a
 * {@link ProcParseError} naming the file and the field.
 *
 * Which fields are mandatory: those the policy arithmetic needs and that
 * every kernel we support (Debian 12's 6.1 and later) has. A missing
 * mandatory field means the sample cannot be trusted, so the agent refuses it
 * (and never shrinks the guest on it). Fields that depend on kernel config or
 * version are optional and documented as such on each interface.
 */
import { ProcParseError } from "./errors.js";

/**
 * Guest page size. balloon_inflate/balloon_deflate and zoneinfo count pages;
 * virtio-balloon itself works in 4 KiB units and every guest we target
 * (x86_64, arm64 with 4K pages) uses 4 KiB pages.
 */
export const PAGE_SIZE = 4096;

/** /proc/meminfo, in bytes. */
export interface Meminfo {
  memTotal: number;
  memFree: number;
  memAvailable: number;
  buffers: number;
  /** Page cache, INCLUDING Shmem (tmpfs and shared anonymous memory). */
  cached: number;
  activeFile: number;
  inactiveFile: number;
  anonPages: number;
  /** File pages mapped into some process (code, mmapped files; also mapped shmem). */
  mapped: number;
  shmem: number;
  dirty: number;
  writeback: number;
  swapTotal: number;
  swapFree: number;
  /** Optional: "Balloon:" exists only on newer kernels (not on 6.1). */
  balloon?: number;
}

/** The /proc/vmstat counters the agent uses. Counters are monotonic since boot. */
export interface Vmstat {
  pgmajfault: number;
  workingsetRefaultFile: number;
  workingsetRefaultAnon: number;
  pswpin: number;
  pswpout: number;
  oomKill: number;
  /** Optional (CONFIG_MEMORY_BALLOON): 4 KiB pages ever inflated. */
  balloonInflate?: number;
  /** Optional (CONFIG_MEMORY_BALLOON): 4 KiB pages ever deflated, deflate-on-oom included. */
  balloonDeflate?: number;
  /** Optional (newer kernels): pages the balloon holds now. */
  nrBalloonPages?: number;
}

/** One line of a PSI file. */
export interface PsiLine {
  /** Percent of wall time stalled, averaged over 10 s. */
  avg10: number;
  avg60: number;
  avg300: number;
  /** Cumulative stall time in microseconds. */
  totalUs: number;
}

/** /proc/pressure/memory. Both lines are mandatory when the file exists. */
export interface Psi {
  some: PsiLine;
  full: PsiLine;
}

/** Zone watermarks from /proc/zoneinfo, summed over all zones. */
export interface ZoneWatermarks {
  /** Sum of every zone's `min`, in bytes. */
  minBytes: number;
  /** Sum of every zone's `low`: kswapd wakes below this. */
  lowBytes: number;
  /** Sum of every zone's `high`: kswapd reclaims until free memory is above this. */
  highBytes: number;
}

type MeminfoKey = Exclude<keyof Meminfo, "balloon">;

/** Kernel spelling → our name. Order is irrelevant; the set is the mandatory list. */
export const MEMINFO_FIELDS: ReadonlyArray<readonly [string, MeminfoKey]> = [
  ["MemTotal", "memTotal"],
  ["MemFree", "memFree"],
  ["MemAvailable", "memAvailable"],
  ["Buffers", "buffers"],
  ["Cached", "cached"],
  ["Active(file)", "activeFile"],
  ["Inactive(file)", "inactiveFile"],
  ["AnonPages", "anonPages"],
  ["Mapped", "mapped"],
  ["Shmem", "shmem"],
  ["Dirty", "dirty"],
  ["Writeback", "writeback"],
  ["SwapTotal", "swapTotal"],
  ["SwapFree", "swapFree"],
];

const DIGITS = /^\d+$/;

function intValue(raw: string | undefined, file: string, field: string): number {
  if (raw === undefined || raw.length === 0) throw new ProcParseError(file, field, "no value (truncated line?)");
  if (!DIGITS.test(raw)) throw new ProcParseError(file, field, `not a non-negative integer: ${JSON.stringify(raw.slice(0, 40))}`);
  const n = Number(raw);
  if (!Number.isSafeInteger(n)) throw new ProcParseError(file, field, `value out of range: ${raw}`);
  return n;
}

function floatValue(raw: string | undefined, file: string, field: string): number {
  if (raw === undefined || raw.length === 0) throw new ProcParseError(file, field, "no value (truncated line?)");
  if (!/^\d+(?:\.\d+)?$/.test(raw)) throw new ProcParseError(file, field, `not a non-negative number: ${JSON.stringify(raw.slice(0, 40))}`);
  const n = Number(raw);
  // Hundreds of digits parse to Infinity; a PSI average is a percentage.
  if (!Number.isFinite(n) || n > 100) throw new ProcParseError(file, field, `value out of range [0, 100]: ${raw.slice(0, 40)}`);
  return n;
}

/** `count` units of `unit` bytes, refused when the product is not an exact (safe) integer. */
function scaled(count: number, unit: number, file: string, field: string): number {
  const bytes = count * unit;
  if (!Number.isSafeInteger(bytes)) throw new ProcParseError(file, field, `value out of range: ${count} × ${unit} bytes`);
  return bytes;
}

/**
 * Parses /proc/meminfo. Every field we use must carry the unit "kB" (the
 * kernel's spelling for KiB); anything else is rejected rather than guessed.
 * @param file path shown in errors
 */
export function parseMeminfo(text: string, file = "/proc/meminfo"): Meminfo {
  const kb = (field: string): number | undefined => {
    const rest = lineValue(text, field, ":")?.trim();
    if (rest === undefined) return undefined;
    const parts = rest.split(/\s+/);
    const value = intValue(parts[0], file, field);
    const unit = parts[1];
    if (unit !== "kB") throw new ProcParseError(file, field, `expected unit "kB", got ${unit === undefined ? "none" : JSON.stringify(unit)}`);
    if (parts.length > 2) throw new ProcParseError(file, field, `unexpected text after the unit: ${JSON.stringify(rest.slice(0, 80))}`);
    return scaled(value, 1024, file, field);
  };
  const out: Partial<Meminfo> = {};
  for (const [field, name] of MEMINFO_FIELDS) {
    const v = kb(field);
    if (v === undefined) throw new ProcParseError(file, field, "missing");
    out[name] = v;
  }
  const balloon = kb("Balloon");
  if (balloon !== undefined) out.balloon = balloon;
  return out as Meminfo;
}

const VMSTAT_MANDATORY: ReadonlyArray<readonly [string, keyof Vmstat]> = [
  ["pgmajfault", "pgmajfault"],
  // Split into file/anon in Linux 5.9; older kernels are out of scope.
  ["workingset_refault_file", "workingsetRefaultFile"],
  ["workingset_refault_anon", "workingsetRefaultAnon"],
  ["pswpin", "pswpin"],
  ["pswpout", "pswpout"],
  ["oom_kill", "oomKill"],
];

const VMSTAT_OPTIONAL: ReadonlyArray<readonly [string, keyof Vmstat]> = [
  ["balloon_inflate", "balloonInflate"],
  ["balloon_deflate", "balloonDeflate"],
  ["nr_balloon_pages", "nrBalloonPages"],
];

/**
 * Parses /proc/vmstat ("name value" lines). Values stay in the kernel's
 * units (events or pages); callers convert pages with {@link PAGE_SIZE}.
 */
export function parseVmstat(text: string, file = "/proc/vmstat"): Vmstat {
  const out: Partial<Vmstat> = {};
  for (const [field, name] of VMSTAT_MANDATORY) {
    const v = lineValue(text, field, " ");
    if (v === undefined) throw new ProcParseError(file, field, "missing");
    out[name] = intValue(v.trim(), file, field);
  }
  for (const [field, name] of VMSTAT_OPTIONAL) {
    const v = lineValue(text, field, " ");
    if (v !== undefined) out[name] = intValue(v.trim(), file, field);
  }
  return out as Vmstat;
}

/**
 * The rest of the first line that starts with `key` + `sep`, or "" for a
 * truncated last line holding only the key, or undefined when absent.
 * Looking up only the fields we use, instead of splitting every line, keeps
 * a 1 Hz sample cheap: at that rate V8 never optimises the parser, so every
 * avoided allocation counts (vmstat has about 170 lines).
 */
export function lineValue(text: string, key: string, sep: string): string | undefined {
  const needle = key + sep;
  let start: number;
  if (text.startsWith(needle)) start = needle.length;
  else {
    const at = text.indexOf(`\n${needle}`);
    if (at < 0) return text === key || text.endsWith(`\n${key}`) ? "" : undefined;
    start = at + 1 + needle.length;
  }
  const end = text.indexOf("\n", start);
  return text.slice(start, end < 0 ? text.length : end);
}

function parsePsiLine(line: string | undefined, kind: "some" | "full", file: string): PsiLine {
  if (line === undefined) throw new ProcParseError(file, kind, "missing");
  const fields = new Map<string, string>();
  for (const part of line.split(/\s+/).slice(1)) {
    const eq = part.indexOf("=");
    if (eq > 0) fields.set(part.slice(0, eq), part.slice(eq + 1));
  }
  const get = (name: string) => {
    const v = fields.get(name);
    if (v === undefined) throw new ProcParseError(file, `${kind} ${name}`, "missing");
    return v;
  };
  return {
    avg10: floatValue(get("avg10"), file, `${kind} avg10`),
    avg60: floatValue(get("avg60"), file, `${kind} avg60`),
    avg300: floatValue(get("avg300"), file, `${kind} avg300`),
    totalUs: intValue(get("total"), file, `${kind} total`),
  };
}

/** Parses /proc/pressure/memory: a "some" and a "full" line, both mandatory. */
export function parsePsi(text: string, file = "/proc/pressure/memory"): Psi {
  const lines = text.split("\n");
  return {
    some: parsePsiLine(lines.find((l) => l.startsWith("some ")), "some", file),
    full: parsePsiLine(lines.find((l) => l.startsWith("full ")), "full", file),
  };
}

/** Parses a one-integer sysctl file such as /proc/sys/vm/min_free_kbytes. */
export function parseSysctlInt(text: string, file: string, field: string): number {
  return intValue(text.trim(), file, field);
}

/**
 * Sums the per-zone `min`, `low` and `high` watermarks of /proc/zoneinfo.
 * The per-CPU pageset lines ("high:  42") carry a colon and are skipped: they
 * are pcp batch limits, not watermarks.
 */
export function parseZoneinfo(text: string, file = "/proc/zoneinfo"): ZoneWatermarks {
  let zones = 0;
  const sums = { min: 0, low: 0, high: 0 };
  const seen = { min: 0, low: 0, high: 0 };
  for (const line of text.split("\n")) {
    if (line.startsWith("Node ")) {
      zones++;
      continue;
    }
    const m = /^\s+(min|low|high)\s+(\S*)$/.exec(line);
    if (!m) continue;
    const key = m[1] as "min" | "low" | "high";
    sums[key] += intValue(m[2], file, key);
    if (!Number.isSafeInteger(sums[key])) throw new ProcParseError(file, key, "sum over zones out of range");
    seen[key]++;
  }
  if (zones === 0) throw new ProcParseError(file, "Node", "no zones found");
  for (const key of ["min", "low", "high"] as const) {
    if (seen[key] !== zones) throw new ProcParseError(file, key, `found in ${seen[key]} of ${zones} zones`);
  }
  return { minBytes: scaled(sums.min, PAGE_SIZE, file, "min"), lowBytes: scaled(sums.low, PAGE_SIZE, file, "low"), highBytes: scaled(sums.high, PAGE_SIZE, file, "high") };
}

/** virtio feature bit: the host lets the guest take pages back on OOM. */
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;

/**
 * Parses a virtio device's sysfs `features` file: one '0'/'1' character per
 * feature bit, bit 0 first. Returns whether `bit` is set.
 */
export function parseVirtioFeatureBit(text: string, bit: number, file: string): boolean {
  const bits = text.trim();
  if (!/^[01]+$/.test(bits)) throw new ProcParseError(file, "features", `not a bit string: ${JSON.stringify(bits.slice(0, 40))}`);
  return bits[bit] === "1";
}
