/**
 * The collector (MOM's "Collectors"): reads the kernel's memory files under a
 * configurable proc/sys root and returns one {@link Sample}. No decisions here.
 *
 * Cost: three small synchronous reads per sample (meminfo, vmstat, PSI) plus
 * zoneinfo and sysfs only every `slowRefreshMs`: well under 1 ms of CPU.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { ProcParseError } from "./errors.js";
import {
  MEMINFO_FIELDS,
  PAGE_SIZE,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  parseMeminfo,
  parsePsi,
  parseSysctlInt,
  parseVirtioFeatureBit,
  parseVmstat,
  parseZoneinfo,
  type Meminfo,
  type Psi,
  type Vmstat,
} from "./procfs.js";

/** The kernel's reclaim watermarks, as the agent uses them. */
export interface Watermarks {
  /** min_free_kbytes in bytes (the sum of zone `min` watermarks when zoneinfo was read). */
  minFreeBytes: number;
  /** Sum of zone `high` watermarks: the free memory kswapd restores before it sleeps. */
  highBytes: number;
  /** "zoneinfo" when summed from /proc/zoneinfo (preferred), "estimate" when derived from /proc/sys/vm/min_free_kbytes. */
  source: "zoneinfo" | "estimate";
}

/** What the guest knows about its own balloon. */
export interface GuestBalloon {
  /** Bytes the balloon holds now, if the kernel tells (meminfo Balloon, nr_balloon_pages, or inflate−deflate). */
  bytes?: number;
  /** Where `bytes` came from. */
  source: "meminfo" | "nr_balloon_pages" | "vmstat-counters" | "unknown";
  /** VIRTIO_BALLOON_F_DEFLATE_ON_OOM from sysfs; undefined when no device is visible. */
  deflateOnOom?: boolean;
}

/**
 * One complete reading. Every field here is mandatory except `psi` (absent
 * when the kernel has PSI off) and the balloon details; a reading that lacks
 * anything else is never produced: {@link Collector.collect} throws instead.
 */
export interface Sample {
  /** Wall clock (Unix ms) when the reading was taken. */
  timestampMs: number;
  /** Monotonic clock (ms) for rates; immune to clock steps after migration. */
  monotonicMs: number;
  meminfo: Meminfo;
  vmstat: Vmstat;
  psi?: Psi;
  watermarks: Watermarks;
  balloon: GuestBalloon;
}

/** Options for {@link Collector}. */
export interface CollectorOptions {
  /** Root of procfs. Default "/proc". Tests point this at a fixture tree. */
  procRoot?: string;
  /** Root of sysfs. Default "/sys". */
  sysRoot?: string;
  /** How often zoneinfo, min_free_kbytes and virtio features are re-read, in ms. Default 60000: they change only on sysctl writes or hotplug. */
  slowRefreshMs?: number;
  /** Wall clock. Default Date.now. */
  now?: () => number;
  /** Monotonic clock in ms. Default performance.now. */
  monotonic?: () => number;
}

function readText(path: string, field = "(file)"): string {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    throw new ProcParseError(path, field, `cannot read: ${(err as NodeJS.ErrnoException).code ?? String(err)}`, { cause: err });
  }
}

function readOptional(path: string): string | undefined {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // PSI disabled at boot (psi=0) gives EOPNOTSUPP on some kernels, ENOENT on others.
    if (code === "ENOENT" || code === "EOPNOTSUPP" || code === "ENOTDIR") return undefined;
    throw new ProcParseError(path, "(file)", `cannot read: ${code ?? String(err)}`, { cause: err });
  }
}

/** Reads samples from a proc/sys tree. */
export class Collector {
  /** The proc root in use. */
  readonly procRoot: string;
  /** The sys root in use. */
  readonly sysRoot: string;
  private readonly slowRefreshMs: number;
  private readonly now: () => number;
  private readonly monotonic: () => number;
  private slow?: { at: number; watermarks: Watermarks; deflateOnOom?: boolean };

  constructor(options: CollectorOptions = {}) {
    this.procRoot = options.procRoot ?? "/proc";
    this.sysRoot = options.sysRoot ?? "/sys";
    this.slowRefreshMs = options.slowRefreshMs ?? 60_000;
    this.now = options.now ?? Date.now;
    this.monotonic = options.monotonic ?? (() => performance.now());
  }

  /** Whether the kernel exposes memory PSI. */
  hasPsi(): boolean {
    return readOptional(join(this.procRoot, "pressure/memory")) !== undefined;
  }

  /** The guest's boot id, or "" when unreadable (the coordinator then cannot tell reboots apart). */
  bootId(): string {
    return readOptional(join(this.procRoot, "sys/kernel/random/boot_id"))?.trim() ?? "";
  }

  /**
   * Takes one reading.
   * @throws ProcParseError when a mandatory file or field is missing or malformed.
   */
  collect(): Sample {
    const timestampMs = this.now();
    const monotonicMs = this.monotonic();
    const meminfoPath = join(this.procRoot, "meminfo");
    const vmstatPath = join(this.procRoot, "vmstat");
    const psiPath = join(this.procRoot, "pressure/memory");
    const meminfo = parseMeminfo(readText(meminfoPath), meminfoPath);
    const vmstat = parseVmstat(readText(vmstatPath), vmstatPath);
    const psiText = readOptional(psiPath);
    const slow = this.slowState(monotonicMs);
    const sample: Sample = {
      timestampMs,
      monotonicMs,
      meminfo,
      vmstat,
      watermarks: slow.watermarks,
      balloon: guestBalloon(meminfo, vmstat, slow.deflateOnOom),
    };
    if (psiText !== undefined) sample.psi = parsePsi(psiText, psiPath);
    const problem = sampleProblem(sample);
    if (problem !== undefined) throw new ProcParseError(meminfoPath, problem.field, `inconsistent sample: ${problem.detail}`);
    return sample;
  }

  private slowState(nowMs: number): { watermarks: Watermarks; deflateOnOom?: boolean } {
    if (this.slow && nowMs - this.slow.at < this.slowRefreshMs) return this.slow;
    const fresh: { at: number; watermarks: Watermarks; deflateOnOom?: boolean } = { at: nowMs, watermarks: this.readWatermarks() };
    const doo = this.readDeflateOnOom();
    if (doo !== undefined) fresh.deflateOnOom = doo;
    this.slow = fresh;
    return fresh;
  }

  private readWatermarks(): Watermarks {
    const zonePath = join(this.procRoot, "zoneinfo");
    const zoneText = readOptional(zonePath);
    if (zoneText !== undefined) {
      const zones = parseZoneinfo(zoneText, zonePath);
      // The zone `min` watermarks are min_free_kbytes split across zones: their sum is the sysctl.
      return { minFreeBytes: zones.minBytes, highBytes: zones.highBytes, source: "zoneinfo" };
    }
    // No zoneinfo: mirror __setup_per_zone_wmarks(): high = min + 2 * max(min/4, managed * wsf / 10000).
    const minPath = join(this.procRoot, "sys/vm/min_free_kbytes");
    const minFreeBytes = parseSysctlInt(readText(minPath, "min_free_kbytes"), minPath, "min_free_kbytes") * 1024;
    const wsfPath = join(this.procRoot, "sys/vm/watermark_scale_factor");
    const wsfText = readOptional(wsfPath);
    const wsf = wsfText === undefined ? 10 : parseSysctlInt(wsfText, wsfPath, "watermark_scale_factor");
    const meminfoPath = join(this.procRoot, "meminfo");
    const total = parseMeminfo(readText(meminfoPath), meminfoPath).memTotal;
    const highBytes = minFreeBytes + 2 * Math.max(minFreeBytes / 4, (total * wsf) / 10_000);
    return { minFreeBytes, highBytes: Math.ceil(highBytes), source: "estimate" };
  }

  private readDeflateOnOom(): boolean | undefined {
    const dir = join(this.sysRoot, "bus/virtio/drivers/virtio_balloon");
    let entries: string[];
    try {
      entries = readdirSync(dir).filter((e) => e.startsWith("virtio"));
    } catch {
      return undefined;
    }
    const first = entries.sort()[0];
    if (first === undefined) return undefined;
    const path = join(dir, first, "features");
    const text = readOptional(path);
    return text === undefined ? undefined : parseVirtioFeatureBit(text, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, path);
  }
}

/** Meminfo fields that count part of RAM, so none can exceed MemTotal: all but the totals and swap. */
const WITHIN_TOTAL = MEMINFO_FIELDS.filter(([field]) => field !== "MemTotal" && field !== "SwapTotal" && field !== "SwapFree");

/** Every number in `value` (recursively), with its path, e.g. "meminfo.memFree". */
function numbersIn(value: unknown, path: string, out: Array<[string, number]>): Array<[string, number]> {
  if (typeof value === "number") out.push([path, value]);
  else if (typeof value === "object" && value !== null) {
    for (const [k, v] of Object.entries(value)) numbersIn(v, path ? `${path}.${k}` : k, out);
  }
  return out;
}

/**
 * Why a parsed sample cannot be true, or undefined when it can: a number
 * that is not finite (or, except the PSI averages, not a safe integer), a
 * MemTotal of 0, a part of RAM larger than MemTotal, SwapFree above
 * SwapTotal, a PSI average outside [0, 100]. Such a sample comes from a
 * broken or hostile kernel view (or a bad test root); the collector refuses
 * it like a missing field, so the agent never shrinks the guest on it.
 * `field` is the kernel's spelling where there is one.
 */
export function sampleProblem(sample: Pick<Sample, "meminfo" | "vmstat" | "watermarks" | "balloon"> & { psi?: Psi | undefined }): { field: string; detail: string } | undefined {
  for (const [path, v] of numbersIn({ meminfo: sample.meminfo, vmstat: sample.vmstat, psi: sample.psi, watermarks: sample.watermarks, balloon: sample.balloon }, "", [])) {
    const isAverage = /^psi\.(some|full)\.avg\d+$/.test(path);
    if (isAverage ? !Number.isFinite(v) || v < 0 || v > 100 : !Number.isSafeInteger(v) || v < 0) {
      return { field: path, detail: `${path} is ${v}, not ${isAverage ? "a percentage" : "a non-negative safe integer"}` };
    }
  }
  const m = sample.meminfo;
  if (m.memTotal === 0) return { field: "MemTotal", detail: "MemTotal is 0" };
  for (const [field, name] of WITHIN_TOTAL) {
    const v = m[name] as number;
    if (v > m.memTotal) return { field, detail: `${field} (${v} bytes) exceeds MemTotal (${m.memTotal} bytes)` };
  }
  if (m.swapFree > m.swapTotal) return { field: "SwapFree", detail: `SwapFree (${m.swapFree} bytes) exceeds SwapTotal (${m.swapTotal} bytes)` };
  return undefined;
}

function guestBalloon(meminfo: Meminfo, vmstat: Vmstat, deflateOnOom: boolean | undefined): GuestBalloon {
  const out: GuestBalloon = { source: "unknown" };
  if (deflateOnOom !== undefined) out.deflateOnOom = deflateOnOom;
  if (meminfo.balloon !== undefined) {
    out.bytes = meminfo.balloon;
    out.source = "meminfo";
  } else if (vmstat.nrBalloonPages !== undefined) {
    out.bytes = vmstat.nrBalloonPages * PAGE_SIZE; // sampleProblem refuses a product beyond the safe range
    out.source = "nr_balloon_pages";
  } else if (vmstat.balloonInflate !== undefined && vmstat.balloonDeflate !== undefined) {
    // Both counters only ever grow; their difference is what the driver holds now.
    out.bytes = Math.max(0, vmstat.balloonInflate - vmstat.balloonDeflate) * PAGE_SIZE;
    out.source = "vmstat-counters";
  }
  return out;
}
