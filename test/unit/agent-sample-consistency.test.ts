// Samples whose values contradict each other are refused as incomplete: by the agent's collector
// (agent/sample.ts sampleProblem) and, for what reaches it anyway, by the coordinator (agent-hub checkSample).
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { afterAll, describe, expect, it } from "vitest";
import { ProcParseError } from "../../agent/errors.js";
import { initialState, onBalloonState, onPhaseEvent, onPolicy, onTick } from "../../agent/runtime.js";
import { Collector, sampleProblem, type Sample } from "../../agent/sample.js";
import { toMemorySample } from "../../agent/wire.js";
import { checkSample } from "../../coordinator/agent-hub.js";
import { MemorySampleSchema, Phase } from "../../gen/ballast/v1/common_pb.js";

const FIXTURE = "test/fixtures/proc/debian-6.1-guest";
const MiB = 1024 * 1024;
const tmpDirs: string[] = [];
afterAll(() => {
  for (const d of tmpDirs) rmSync(d, { recursive: true, force: true });
});

/** A copy of the idle guest capture with `edit` applied to its files. */
function root(edit: (files: { meminfo: string; vmstat: string; zoneinfo?: string; minFree: string }) => void): string {
  const dir = mkdtempSync(join(tmpdir(), "ballast-consistency-"));
  tmpDirs.push(dir);
  cpSync(FIXTURE, dir, { recursive: true });
  const files: { meminfo: string; vmstat: string; zoneinfo?: string; minFree: string } = {
    meminfo: readFileSync(join(dir, "meminfo"), "utf8"),
    vmstat: readFileSync(join(dir, "vmstat"), "utf8"),
    zoneinfo: readFileSync(join(dir, "zoneinfo"), "utf8"),
    minFree: readFileSync(join(dir, "sys/vm/min_free_kbytes"), "utf8"),
  };
  edit(files);
  writeFileSync(join(dir, "meminfo"), files.meminfo);
  writeFileSync(join(dir, "vmstat"), files.vmstat);
  writeFileSync(join(dir, "sys/vm/min_free_kbytes"), files.minFree);
  if (files.zoneinfo === undefined) rmSync(join(dir, "zoneinfo"));
  return dir;
}

const setKb = (text: string, key: string, kb: number | string) => {
  const re = new RegExp(`^${key.replace(/[()]/g, "\\$&")}:.*$`, "m");
  expect(re.test(text), key).toBe(true);
  return text.replace(re, `${key}:  ${kb} kB`);
};
const collect = (dir: string) => new Collector({ procRoot: dir, sysRoot: `${FIXTURE}-sys` }).collect();
const TOTAL_KB = 981700; // the capture's MemTotal

describe("the collector refuses contradictory samples", () => {
  it("accepts the real capture", () => {
    const s = collect(root(() => {}));
    expect(sampleProblem(s)).toBeUndefined();
    expect(checkSample(create(MemorySampleSchema, toMemorySample(s, undefined)))).toBe("");
  });

  it.each<[string, (f: { meminfo: string; vmstat: string; zoneinfo?: string; minFree: string }) => void, string]>([
    ["MemFree > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "MemFree", TOTAL_KB + 1)), "MemFree"],
    ["MemAvailable > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "MemAvailable", TOTAL_KB + 1)), "MemAvailable"],
    ["MemTotal 0", (f) => (f.meminfo = setKb(f.meminfo, "MemTotal", 0)), "MemTotal"],
    ["Cached > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "Cached", 2 * TOTAL_KB)), "Cached"],
    ["Active(file) > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "Active(file)", TOTAL_KB + 4)), "Active(file)"],
    ["Mapped > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "Mapped", TOTAL_KB * 10)), "Mapped"],
    ["Inactive(file) > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "Inactive(file)", TOTAL_KB + 1)), "Inactive(file)"],
    ["AnonPages > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "AnonPages", TOTAL_KB + 1)), "AnonPages"],
    ["Shmem > MemTotal", (f) => (f.meminfo = setKb(f.meminfo, "Shmem", TOTAL_KB + 1)), "Shmem"],
    ["SwapFree > SwapTotal", (f) => (f.meminfo = setKb(f.meminfo, "SwapFree", 1)), "SwapFree"],
    // Unsafe integers that parse: counted in pages, they leave the safe range only once multiplied into bytes.
    ["nr_balloon_pages × 4096 unsafe", (f) => (f.vmstat += "nr_balloon_pages 9007199254740991\n"), "balloon.bytes"],
    [
      "min_free_kbytes × 1024 unsafe (no zoneinfo: the estimate)",
      (f) => {
        delete f.zoneinfo;
        f.minFree = "9007199254740991\n";
      },
      "watermarks.minFreeBytes",
    ],
    [
      "min_free_kbytes just safe in bytes (no zoneinfo: the estimated high watermark leaves the safe range)",
      (f) => {
        delete f.zoneinfo;
        f.minFree = "8796093022207\n";
      },
      "watermarks.highBytes",
    ],
  ])("%s: ProcParseError naming the field", (_n, edit, field) => {
    const dir = root(edit);
    let err: unknown;
    try {
      collect(dir);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ProcParseError);
    expect((err as ProcParseError).field).toBe(field);
    expect((err as Error).message).toMatch(/inconsistent sample|out of range/);
  });

  it("refuses NaN, Infinity, negative and fractional values handed to sampleProblem directly", () => {
    const good = collect(root(() => {}));
    const bad = (patch: (s: Sample) => void): Sample => {
      const s = structuredClone(good);
      patch(s);
      return s;
    };
    expect(sampleProblem(bad((s) => (s.meminfo.memFree = Number.NaN)))?.field).toBe("meminfo.memFree");
    expect(sampleProblem(bad((s) => (s.vmstat.pgmajfault = Number.POSITIVE_INFINITY)))?.field).toBe("vmstat.pgmajfault");
    expect(sampleProblem(bad((s) => (s.meminfo.dirty = -1)))?.field).toBe("meminfo.dirty");
    expect(sampleProblem(bad((s) => (s.watermarks.highBytes = 1.5)))?.field).toBe("watermarks.highBytes");
    expect(sampleProblem(bad((s) => (s.meminfo.memTotal = 2 ** 53)))?.field).toBe("meminfo.memTotal");
    expect(sampleProblem(bad((s) => (s.psi!.some.avg10 = 100.5)))?.field).toBe("psi.some.avg10");
    expect(sampleProblem(bad((s) => (s.psi!.full.avg300 = 0.25)))).toBeUndefined();
  });
});

describe("a refused sample is an incomplete one: it never shrinks the guest", () => {
  // What agent/session.ts trySample does: any collect() failure becomes "no sample".
  const trySample = (c: Collector): Sample | undefined => {
    try {
      return c.collect();
    } catch {
      return undefined;
    }
  };
  const state = () => onBalloonState(onPolicy(initialState(), { floorBytes: 300 * MiB, maxBytes: 1024 * MiB, sampleIntervalMs: 1000, steadyState: true }), { targetBytes: 1024 * MiB, actualBytes: 1024 * MiB, ramBytes: 1024 * MiB });

  it("PREPARE on a sample with MemFree > MemTotal keeps the current target", () => {
    const dir = root((f) => (f.meminfo = setKb(setKb(f.meminfo, "MemFree", 4 * TOTAL_KB), "MemAvailable", 4 * TOTAL_KB)));
    const sample = trySample(new Collector({ procRoot: dir, sysRoot: `${FIXTURE}-sys` }));
    expect(sample).toBeUndefined();
    const step = onPhaseEvent(state(), { migrationId: "m1", phase: Phase.PREPARE, pass: 0 }, sample, Date.now());
    const targets = step.effects.flatMap((e) => (e.kind === "balloon" ? [e.targetBytes] : []));
    expect(targets).toEqual([1024 * MiB]);
  });

  it("steady-state ticks on refused samples request nothing", () => {
    const dir = root((f) => (f.meminfo = setKb(f.meminfo, "Cached", 3 * TOTAL_KB)));
    const c = new Collector({ procRoot: dir, sysRoot: `${FIXTURE}-sys` });
    let s = state();
    for (let i = 0; i < 10; i++) {
      const step = onTick(s, trySample(c));
      expect(step.effects.filter((e) => e.kind === "balloon")).toEqual([]);
      s = step.state;
    }
  });
});

describe("coordinator checkSample refuses the same set", () => {
  const good = {
    timestampMs: 1n,
    memTotalBytes: 1024n * BigInt(MiB),
    memFreeBytes: 100n * BigInt(MiB),
    memAvailableBytes: 500n * BigInt(MiB),
    cachedBytes: 400n * BigInt(MiB),
    activeFileBytes: 100n * BigInt(MiB),
    inactiveFileBytes: 300n * BigInt(MiB),
    anonBytes: 200n * BigInt(MiB),
    shmemBytes: 1n,
    dirtyBytes: 1n,
    psiSomeAvg10: 1.5,
  };
  const MAX = BigInt(Number.MAX_SAFE_INTEGER);
  it("accepts a consistent sample", () => {
    expect(checkSample(create(MemorySampleSchema, good))).toBe("");
  });
  it.each<[string, Record<string, unknown>, RegExp]>([
    ["MemTotal 0", { memTotalBytes: 0n }, /mem_total_bytes is 0/],
    ["MemFree > MemTotal", { memFreeBytes: 2n * BigInt(1024 * MiB) }, /mem_free_bytes exceeds/],
    ["MemAvailable > MemTotal", { memAvailableBytes: 1025n * BigInt(MiB) }, /mem_available_bytes exceeds/],
    ["Cached > MemTotal", { cachedBytes: 1025n * BigInt(MiB) }, /cached_bytes exceeds/],
    ["Active(file) > MemTotal", { activeFileBytes: 1025n * BigInt(MiB) }, /active_file_bytes exceeds/],
    ["Inactive(file) > MemTotal", { inactiveFileBytes: 1025n * BigInt(MiB) }, /inactive_file_bytes exceeds/],
    ["AnonPages > MemTotal", { anonBytes: 1025n * BigInt(MiB) }, /anon_bytes exceeds/],
    ["SwapFree > SwapTotal", { swapFreeBytes: 1n }, /swap_free_bytes exceeds/],
    ["unsafe MemTotal (and everything below it)", { memTotalBytes: MAX + 1n }, /mem_total_bytes is not a safe integer/],
    ["unsafe counter", { pgmajfault: 2n ** 64n - 1n }, /pgmajfault is not a safe integer/],
    ["unsafe timestamp", { timestampMs: -(2n ** 63n) }, /timestamp_ms is not a safe integer/],
    ["PSI NaN", { psiSomeAvg10: Number.NaN }, /psi_some_avg10/],
    ["PSI above 100", { psiFullAvg10: 101 }, /psi_full_avg10/],
  ])("%s", (_n, patch, why) => {
    expect(checkSample(create(MemorySampleSchema, { ...good, ...patch }))).toMatch(why);
  });
});
