/**
 * Guest workloads for tests, the demo and the bench, driven through the
 * serial shell. Each sets up one kind of memory state before a migration;
 * the same functions serve every caller so that "workload (c)" means one
 * thing everywhere.
 */
import { FailedPreconditionError } from "../shared/errors.js";
import { GUEST_WORKLOAD_PATH } from "./guest-image.js";
import type { GuestShell } from "./serial-shell.js";

/** The node binary and workload script inside the guest. */
const W = `node ${GUEST_WORKLOAD_PATH}`;

async function must(shell: GuestShell, cmd: string, timeoutMs = 120_000): Promise<string> {
  const r = await shell.run(cmd, { timeoutMs });
  if (r.exitCode !== 0) throw new FailedPreconditionError(`guest command failed (${r.exitCode}): ${cmd}\n${r.output}`);
  return r.output;
}

/** Parses `/proc/meminfo` text into bytes by field name. */
export function parseMeminfoBytes(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^([^:]+):\s+(\d+)(?:\s+kB)?$/.exec(line.trim());
    if (m) out[m[1] as string] = Number(m[2]) * (line.includes("kB") ? 1024 : 1);
  }
  return out;
}

/** Parses `/proc/vmstat` text into counters. */
export function parseVmstatCounters(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const [k, v] = line.trim().split(/\s+/);
    if (k && v !== undefined && /^\d+$/.test(v)) out[k] = Number(v);
  }
  return out;
}

/** The guest's meminfo, in bytes. */
export async function guestMeminfo(shell: GuestShell): Promise<Record<string, number>> {
  return parseMeminfoBytes(await shell.readFile("/proc/meminfo"));
}

/** The guest's vmstat counters. */
export async function guestVmstat(shell: GuestShell): Promise<Record<string, number>> {
  return parseVmstatCounters(await shell.readFile("/proc/vmstat"));
}

/** (b) freed anon: write N MiB of non-zero anon memory, then free it. */
export async function freedAnon(shell: GuestShell, mib: number): Promise<void> {
  await must(shell, `${W} freed-anon --mib ${mib}`);
}

/** Clean page cache: read N MiB of the data disk's file. */
export async function cacheRead(shell: GuestShell, mib: number): Promise<void> {
  await must(shell, `${W} cache-read --file /data/blob --mib ${mib}`);
}

/** A background writer that holds N MiB and rewrites it at R MiB/s, logging progress to `progressFile`. */
export async function startHotWriter(shell: GuestShell, o: { mib: number; rateMiB: number; progressFile?: string }): Promise<void> {
  const progress = o.progressFile ?? "/tmp/hot-writer.progress";
  await must(shell, `rm -f ${progress}; ${W} hot-writer --mib ${o.mib} --rate-mib ${o.rateMiB} --progress ${progress} >/tmp/hot-writer.out 2>&1 &`);
}

/** A background burst: waits for `triggerFile`, then allocates and touches N MiB, holds it, prints burst-done to `outFile`. */
export async function startBurst(shell: GuestShell, o: { mib: number; triggerFile: string; outFile: string; holdMs?: number }): Promise<void> {
  await must(shell, `rm -f ${o.triggerFile} ${o.outFile}; ${W} burst --mib ${o.mib} --after-file ${o.triggerFile} --hold-ms ${o.holdMs ?? 3000} >${o.outFile} 2>&1 &`);
}

/** Reads the hot writer's progress log: one JSON line per half second, `t` in guest wall-clock ms. */
export async function hotWriterProgress(shell: GuestShell, progressFile = "/tmp/hot-writer.progress"): Promise<{ t: number; bytes: number }[]> {
  const r = await shell.run(`cat ${progressFile} 2>/dev/null`, { timeoutMs: 60_000 });
  const points: { t: number; bytes: number }[] = [];
  for (const line of r.output.split("\n")) {
    try {
      const rec = JSON.parse(line) as { t?: unknown; bytes?: unknown };
      if (typeof rec.t === "number" && typeof rec.bytes === "number") points.push({ t: rec.t, bytes: rec.bytes });
    } catch {
      // partial last line while the writer appends
    }
  }
  return points;
}

/**
 * Guest wall clock minus host wall clock, in ms (to map host instants onto
 * guest timestamps). busybox `date` has no %N, but `adjtimex` prints the
 * kernel's time with microseconds.
 */
export async function guestClockOffsetMs(shell: GuestShell): Promise<number> {
  const before = Date.now();
  const out = await must(shell, "adjtimex");
  const after = Date.now();
  const sec = /time\.tv_sec:\s+(\d+)/.exec(out)?.[1];
  const usec = /time\.tv_usec:\s+(\d+)/.exec(out)?.[1];
  if (sec === undefined || usec === undefined) throw new FailedPreconditionError(`cannot read the guest clock from adjtimex: ${out.slice(0, 200)}`);
  return Number(sec) * 1000 + Number(usec) / 1000 - (before + after) / 2;
}

/** Write rate (MiB/s) of the hot writer between two wall-clock instants (ms), from its progress log. */
export function rateBetween(points: { t: number; bytes: number }[], fromMs: number, toMs: number): number {
  const inside = points.filter((p) => p.t >= fromMs && p.t <= toMs);
  const first = inside[0];
  const last = inside[inside.length - 1];
  if (!first || !last || last.t === first.t) return 0;
  return (last.bytes - first.bytes) / (1024 * 1024) / ((last.t - first.t) / 1000);
}
