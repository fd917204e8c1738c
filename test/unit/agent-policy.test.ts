// The pure policy as tables: every number below is MiB unless it says otherwise.
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  DEFAULT_POLICY_OPTIONS,
  assessPressure,
  clampTarget,
  estimateMemory,
  freshTracker,
  postcopyDecision,
  prepareDecision,
  prepareReclaimBytes,
  pressureTarget,
  resolveBounds,
  restoreDecision,
  steadyDecision,
  type Bounds,
  type MemoryEstimate,
  type Pressure,
  type SteadyTracker,
} from "../../agent/policy.js";
import { Collector, type Sample } from "../../agent/sample.js";

const MiB = 1024 * 1024;
const O = DEFAULT_POLICY_OPTIONS;

interface Shape {
  total: number;
  free: number;
  avail: number;
  activeFile: number;
  inactiveFile: number;
  mapped: number;
  anon: number;
  shmem: number;
  dirty: number;
  wmHigh: number;
  balloon?: number;
  doo?: boolean;
  psiSome?: number;
  psiSomeTotalUs?: number;
  refaultFile?: number;
  refaultAnon?: number;
  pswpin?: number;
  oom?: number;
  t?: number;
}

// The rig's cache-heavy 1 GiB guest, roughly: 65 MiB boot reserve, ~176 MiB anon+kernel, 500 MiB cold cache, 40 MiB node code.
const CACHE_HEAVY: Shape = { total: 959, free: 243, avail: 700, activeFile: 40, inactiveFile: 500, mapped: 30, anon: 150, shmem: 0, dirty: 0, wmHigh: 66 };

function mk(s: Partial<Shape> = {}): Sample {
  const x = { ...CACHE_HEAVY, ...s };
  const sample: Sample = {
    timestampMs: 1_700_000_000_000 + (x.t ?? 0),
    monotonicMs: x.t ?? 0,
    meminfo: {
      memTotal: x.total * MiB,
      memFree: x.free * MiB,
      memAvailable: x.avail * MiB,
      buffers: 0,
      cached: (x.activeFile + x.inactiveFile + x.shmem) * MiB,
      activeFile: x.activeFile * MiB,
      inactiveFile: x.inactiveFile * MiB,
      anonPages: x.anon * MiB,
      mapped: x.mapped * MiB,
      shmem: x.shmem * MiB,
      dirty: x.dirty * MiB,
      writeback: 0,
      swapTotal: 0,
      swapFree: 0,
    },
    vmstat: {
      pgmajfault: 100,
      workingsetRefaultFile: x.refaultFile ?? 0,
      workingsetRefaultAnon: x.refaultAnon ?? 0,
      pswpin: x.pswpin ?? 0,
      pswpout: 0,
      oomKill: x.oom ?? 0,
    },
    psi: {
      some: { avg10: x.psiSome ?? 0, avg60: 0, avg300: 0, totalUs: x.psiSomeTotalUs ?? 0 },
      full: { avg10: 0, avg60: 0, avg300: 0, totalUs: 0 },
    },
    watermarks: { minFreeBytes: (x.wmHigh / 1.5) * MiB, highBytes: x.wmHigh * MiB, source: "zoneinfo" },
    balloon: x.balloon === undefined ? { source: "unknown" } : { bytes: x.balloon * MiB, source: "vmstat-counters" },
  };
  if (x.doo !== undefined) sample.balloon.deflateOnOom = x.doo;
  return sample;
}

const RAM = { ramBytes: 1024 * MiB };
const BOUNDS: Bounds = { floorBytes: 256 * MiB, maxBytes: 1024 * MiB };
const mib = (bytes: number | undefined) => (bytes === undefined ? undefined : bytes / MiB);

describe("estimateMemory", () => {
  it("the formulas, on the cache-heavy guest", () => {
    const e = estimateMemory(mk(), RAM);
    // inUse = 1024 - 0 - 243; base = inUse - fileLru(540) + dirty(0)
    expect(mib(e.inUseBytes)).toBe(781);
    expect(mib(e.baseBytes)).toBe(241);
    expect(mib(e.steadyHotFileBytes)).toBe(40); // max(Active(file) 40, Mapped 30)
    expect(mib(e.prepareHotFileBytes)).toBe(30); // max(Mapped 30, 0.25 * 40)
    expect(mib(e.steadyRawBytes)).toBe(241 + 40 + 66 + 128);
    expect(mib(e.prepareRawBytes)).toBe(241 + 30 + 66 + 128);
    expect(mib(e.workingSetBytes)).toBe(281); // the rig: ~216 visible + ~65 boot
  });

  it.each([
    // name, shape, expected base
    ["dirty cache cannot be dropped", { dirty: 20 }, 261],
    ["shmem is not page cache the balloon can take", { shmem: 100, free: 143 }, 341],
    ["more anon, less free", { free: 143 }, 341],
  ] as const)("%s", (_, shape, base) => {
    expect(mib(estimateMemory(mk(shape), RAM).baseBytes)).toBe(base);
  });

  it("hot file set: Mapped, or a quarter of Active(file) if larger, never more than the file LRU", () => {
    expect(mib(estimateMemory(mk({ activeFile: 400, inactiveFile: 140 }), RAM).prepareHotFileBytes)).toBe(100);
    expect(mib(estimateMemory(mk({ mapped: 900 }), RAM).prepareHotFileBytes)).toBe(540);
  });

  describe("deflate-on-oom arithmetic (1 GiB guest, 300 MiB ballooned, 500 MiB in use incl. 65 MiB boot)", () => {
    // With deflate-on-oom MemTotal keeps the balloon (959) and MemFree drops; without it MemTotal shrinks to 659.
    const withDoo = mk({ total: 959, free: 224, balloon: 300, doo: true });
    const withoutDoo = mk({ total: 659, free: 224, balloon: 300, doo: false });

    it("RAM known from the coordinator: in-use is ram - balloon - MemFree either way", () => {
      expect(mib(estimateMemory(withDoo, RAM).inUseBytes)).toBe(500);
      expect(mib(estimateMemory(withoutDoo, RAM).inUseBytes)).toBe(500);
    });

    it("RAM unknown: MemTotal (+ balloon when it was taken out of MemTotal) + boot-reserve estimate", () => {
      const a = estimateMemory(withDoo, {});
      const b = estimateMemory(withoutDoo, {});
      expect(mib(a.unballoonedTotalBytes)).toBe(959);
      expect(mib(b.unballoonedTotalBytes)).toBe(959);
      expect(a.ramSource).toBe("estimate");
      expect(Math.abs(mib(a.ramBytes)! - 1024)).toBeLessThan(10);
      expect(a.ramBytes).toBe(b.ramBytes);
    });

    it("deflate-on-oom unknown is taken as off, which can only overstate in-use (safe)", () => {
      const unknown = mk({ total: 959, free: 224, balloon: 300 });
      expect(estimateMemory(unknown, {}).deflateOnOom).toBe(false);
      expect(estimateMemory(unknown, {}).inUseBytes).toBeGreaterThan(estimateMemory(withDoo, {}).inUseBytes);
    });

    it("balloon size from the coordinator (ram - actual) when the guest has no counters", () => {
      const noCounters = mk({ total: 959, free: 224, doo: true });
      const e = estimateMemory(noCounters, { ramBytes: 1024 * MiB, actualBytes: 724 * MiB });
      expect(e.balloonSource).toBe("coordinator");
      expect(mib(e.inUseBytes)).toBe(500);
      // No counters and no coordinator: balloon assumed 0, in-use overstated by the balloon.
      expect(mib(estimateMemory(noCounters, RAM).inUseBytes)).toBe(800);
    });
  });

  describe("on the real Debian 6.1 guest captures (1 GiB RAM, deflate-on-oom)", () => {
    // Each capture is a full procRoot (zoneinfo, min_free_kbytes included); "<name>-sys" is its sysRoot.
    function guest(name: string): Sample {
      const root = join("test/fixtures/proc", name);
      return new Collector({ procRoot: root, sysRoot: `${root}-sys` }).collect();
    }

    it("ballooned to 512 MiB: in-use is ram - balloon - MemFree; the RAM estimate lands near 1 GiB", () => {
      const s = guest("debian-6.1-guest-ballooned");
      const known = estimateMemory(s, RAM);
      const guessed = estimateMemory(s, {});
      expect(mib(known.balloonBytes)).toBe(512);
      expect(known.inUseBytes).toBe(1024 * MiB - 512 * MiB - s.meminfo.memFree);
      // deflate-on-oom: MemTotal still counts the balloon, so nothing is added back.
      expect(guessed.unballoonedTotalBytes).toBe(s.meminfo.memTotal);
      expect(Math.abs(guessed.ramBytes - 1024 * MiB)).toBeLessThan(8 * MiB);
    });

    it("500 MiB of clean cache (Cached): PREPARE gives most of it back, keeps base + watermark + reserve", () => {
      const s = guest("debian-6.1-guest-cache");
      const e = estimateMemory(s, RAM);
      expect(e.fileLruBytes).toBeGreaterThan(450 * MiB);
      const d = prepareDecision(e, assessPressure(s, undefined), 1024 * MiB, BOUNDS);
      expect(d.reason).toBe("prepare");
      // What it gives back is more than the free memory: over half of the page cache goes too.
      expect(1024 * MiB - d.targetBytes!).toBeGreaterThan(s.meminfo.memFree + 0.5 * e.fileLruBytes);
      expect(d.targetBytes!).toBeGreaterThanOrEqual(e.baseBytes + e.watermarkHighBytes + O.reserveBytes);
      // Steady state keeps Active(file) too, so it never asks for less than PREPARE.
      expect(e.steadyRawBytes).toBeGreaterThanOrEqual(e.prepareRawBytes);
    });
  });
});

describe("bounds and clamping", () => {
  it.each([
    // policy, ram, floor, max
    [undefined, 1024, 256, 1024],
    [{ floorBytes: 512 * MiB, maxBytes: 2048 * MiB }, 1024, 512, 1024],
    [{ floorBytes: 100 * MiB, maxBytes: 768 * MiB }, 1024, 256, 768],
    [{ floorBytes: 0, maxBytes: 0 }, 1024, 256, 1024],
  ] as const)("policy %o, ram %i -> [%i, %i]", (policy, ram, floor, max) => {
    expect(resolveBounds(policy, ram * MiB)).toEqual({ floorBytes: floor * MiB, maxBytes: max * MiB });
  });

  it.each([
    [100, 256],
    [300.2, 301],
    [2000, 1024],
  ])("clamp %f -> %i", (x, want) => expect(mib(clampTarget(x * MiB, BOUNDS))).toBe(want));

  it("floor wins when floor > max", () => {
    expect(mib(clampTarget(100 * MiB, { floorBytes: 600 * MiB, maxBytes: 500 * MiB }))).toBe(600);
  });
});

describe("assessPressure", () => {
  const base = mk({ t: 0, psiSomeTotalUs: 0, refaultFile: 1000 });
  it.each([
    ["quiet", mk({ t: 1000, refaultFile: 1100 }), false, []],
    ["PSI some avg10 over threshold", mk({ t: 1000, psiSome: 12 }), true, ["psi"]],
    ["PSI over the last interval (avg10 still low)", mk({ t: 200, psiSomeTotalUs: 40_000 }), true, ["psi"]],
    ["refault rate", mk({ t: 1000, refaultFile: 1000 + 600 }), true, ["refaults"]],
    ["swap-ins count as refaults", mk({ t: 500, refaultFile: 1000, pswpin: 300 }), true, ["refaults"]],
    ["low MemAvailable", mk({ t: 1000, refaultFile: 1000, avail: 40 }), true, ["MemAvailable"]],
    ["OOM kill", mk({ t: 1000, refaultFile: 1000, oom: 1 }), true, ["OOM"]],
  ] as const)("%s", (_, sample, under, reasons) => {
    const p = assessPressure(sample, base);
    expect(p.under).toBe(under);
    expect(p.reasons.length).toBe(reasons.length);
    reasons.forEach((r, i) => expect(p.reasons[i]).toContain(r));
  });

  it("rates need a long enough window; counters that went backwards count as nothing", () => {
    expect(assessPressure(mk({ t: 50, refaultFile: 5000 }), base).refaultsPerSec).toBeUndefined();
    expect(assessPressure(mk({ t: 1000, refaultFile: 10 }), base).refaultsPerSec).toBe(0);
    expect(assessPressure(mk({ oom: 3 }), undefined).severe).toBe(false);
  });
});

function pressure(over: Partial<Pressure> = {}): Pressure {
  return { under: false, severe: false, reasons: [], memAvailableBytes: 500 * MiB, oomKills: 0, ...over };
}
const PRESSED = pressure({ under: true, reasons: ["psi some 20.0% >= 10%"], psiSomePct: 20 });

function est(steadyRaw: number): MemoryEstimate {
  return { ...estimateMemory(mk(), RAM), steadyRawBytes: steadyRaw * MiB };
}

/** Runs steadyDecision over a sequence of raw estimates, applying each requested target. */
function runSteady(start: number, raws: Array<number | "incomplete" | "pressure">, bounds = BOUNDS, tracker: SteadyTracker = freshTracker()) {
  let current = start * MiB;
  const targets: Array<number | undefined> = [];
  raws.forEach((raw, i) => {
    const nowMs = i * 1000;
    const input =
      raw === "incomplete"
        ? { currentBytes: current, tracker, nowMs }
        : { currentBytes: current, tracker, nowMs, estimate: est(raw === "pressure" ? 300 : raw), pressure: raw === "pressure" ? PRESSED : pressure() };
    const out = steadyDecision(input, bounds);
    tracker = out.tracker;
    targets.push(mib(out.decision.targetBytes));
    if (out.decision.targetBytes !== undefined) current = out.decision.targetBytes;
  });
  return { targets, current: current / MiB };
}

describe("steady state: slow to shrink, fast to grow", () => {
  it.each([
    ["grows at once", 400, [600], [600]],
    ["ignores changes under minChange", 400, [410, 390, 395], [undefined, undefined, undefined]],
    ["shrinks only after 5 low samples, then 32 MiB per sample", 800, [400, 400, 400, 400, 400, 400, 400], [undefined, undefined, undefined, undefined, 768, 736, 704]],
    ["shrinks to the highest of the held estimates", 560, [500, 520, 480, 540, 490], [undefined, undefined, undefined, undefined, 540]],
    ["a sample near current restarts the count", 800, [400, 400, 400, 400, 795, 400, 400, 400, 400], Array(9).fill(undefined)],
    ["an incomplete sample restarts the count and never shrinks", 800, [400, 400, 400, 400, "incomplete", 400, 400, 400, 400], Array(9).fill(undefined)],
    ["never above max", 400, [5000], [1024]],
    // 268 -> 256 would be a change under minChange: not worth a request.
    ["never below the floor", 300, [100, 100, 100, 100, 100, 100, 100], [undefined, undefined, undefined, undefined, 268, undefined, undefined]],
    ["pressure grows by growStep at once", 400, ["pressure"], [528]],
    ["no shrink within the cooldown after pressure", 700, ["pressure", 400, 400, 400, 400, 400, 400, 400], [828, ...Array(7).fill(undefined)]],
  ] as const)("%s", (_, start, raws, want) => {
    expect(runSteady(start, [...raws]).targets).toEqual(want);
  });

  it("shrinks again once the cooldown has passed", () => {
    const raws: Array<number | "pressure"> = ["pressure", ...Array(40).fill(400)];
    const { targets } = runSteady(700, raws);
    const firstShrink = targets.findIndex((t, i) => i > 0 && t !== undefined);
    expect(firstShrink).toBe(30); // pressure at t=0, cooldown 30 s, one sample per second
    expect(targets[firstShrink]).toBe(828 - 32);
  });

  it("honours a Policy floor above the hard floor", () => {
    const bounds = resolveBounds({ floorBytes: 700 * MiB, maxBytes: 1024 * MiB }, 1024 * MiB);
    const { current } = runSteady(800, Array(12).fill(300), bounds);
    expect(current).toBeGreaterThanOrEqual(700);
    expect(current).toBeLessThan(700 + O.minChangeBytes / MiB);
  });
});

describe("pressureTarget", () => {
  it.each([
    ["growStep", pressure({ under: true }), 400, 528],
    ["MemAvailable shortfall larger than growStep", pressure({ under: true, memAvailableBytes: 0 }), 400, 528],
    ["OOM kill: straight to max", pressure({ under: true, severe: true, oomKills: 1 }), 400, 1024],
    ["capped at max", pressure({ under: true }), 1000, 1024],
  ] as const)("%s", (_, p, current, want) => {
    expect(mib(pressureTarget(current * MiB, p, BOUNDS))).toBe(want);
  });

  it("closes a MemAvailable shortfall in one step when the reserve is larger than growStep", () => {
    const options = { ...O, reserveBytes: 256 * MiB };
    expect(mib(pressureTarget(400 * MiB, pressure({ under: true, memAvailableBytes: 6 * MiB }), BOUNDS, options))).toBe(650);
  });
});

describe("PREPARE", () => {
  const e = estimateMemory(mk(), RAM);

  it("gives back clean page cache but keeps base + hot file set + high watermark + reserve", () => {
    const d = prepareDecision(e, pressure(), 1024 * MiB, BOUNDS);
    expect(d.reason).toBe("prepare");
    expect(mib(d.targetBytes)).toBe(465);
    // Includes cache: far below what is in use now (781 MiB, 540 of it page cache)...
    expect(d.targetBytes!).toBeLessThan(e.inUseBytes);
    // ...yet above the rig's failed "used excluding cache + 64 MiB" by the watermark and the hot file set.
    const usedExclCachePlus64 = e.inUseBytes - e.fileLruBytes + 64 * MiB;
    expect(d.targetBytes! - usedExclCachePlus64).toBe(e.watermarkHighBytes + e.prepareHotFileBytes + (O.reserveBytes - 64 * MiB));
    expect(d.detail).toContain("high wmark 66.0 MiB");
  });

  it.each([
    ["default", {}, undefined, 465],
    ["Policy floor above the estimate", {}, { floorBytes: 600 * MiB, maxBytes: 1024 * MiB }, 600],
    ["Policy max below the estimate", {}, { floorBytes: 0, maxBytes: 400 * MiB }, 400],
    ["smaller reserve", { reserveBytes: 64 * MiB }, undefined, 401],
    ["keep all of Active(file)", { prepareActiveFileKeep: 1 }, undefined, 475],
  ] as const)("%s", (_, opts, policy, want) => {
    const options = { ...O, ...opts };
    const est2 = estimateMemory(mk(), RAM, options);
    const bounds = resolveBounds(policy, 1024 * MiB, options);
    expect(mib(prepareDecision(est2, pressure(), 1024 * MiB, bounds, options).targetBytes)).toBe(want);
  });

  it("under pressure grows instead of giving back (still reason prepare: the coordinator waits for it)", () => {
    const d = prepareDecision(e, PRESSED, 500 * MiB, BOUNDS);
    expect(d.reason).toBe("prepare");
    expect(d.detail).toContain("under pressure");
    expect(mib(d.targetBytes)).toBe(628);
  });

  it("reclaim before inflation: the shrink minus free memory above the watermark, capped at cold cache", () => {
    const s = mk();
    // shrink 1024 - 465 = 559; free above watermark 243 - 66 = 177; 559 - 177 = 382 <= cold cache 540 - 30 = 510
    expect(mib(prepareReclaimBytes(e, s, 1024 * MiB, 465 * MiB))).toBe(382);
    expect(prepareReclaimBytes(e, s, 465 * MiB, 465 * MiB)).toBe(0);
    expect(prepareReclaimBytes(e, mk({ free: 900 }), 1024 * MiB, 465 * MiB)).toBe(0);
  });
});

describe("post-copy: deflate on demand", () => {
  const prev = mk({ t: 0, refaultFile: 0, psiSomeTotalUs: 0 });
  it.each([
    ["no pressure: hold", mk({ t: 200 }), undefined],
    ["PSI some avg10", mk({ t: 200, psiSome: 15 }), 593],
    ["stalls in the last 200 ms", mk({ t: 200, psiSomeTotalUs: 30_000 }), 593],
    ["refault rate", mk({ t: 200, refaultFile: 200 }), 593],
    ["low MemAvailable", mk({ t: 200, avail: 30 }), 593],
    ["OOM kill", mk({ t: 200, oom: 1 }), 1024],
  ] as const)("%s", (_, sample, want) => {
    const d = postcopyDecision(465 * MiB, assessPressure(sample, prev), BOUNDS);
    expect(d.reason).toBe("demand");
    expect(mib(d.targetBytes)).toBe(want);
  });

  it("steps up sample after sample while the pressure lasts, up to max", () => {
    let current = 465 * MiB;
    let before = prev;
    const seen: number[] = [];
    for (let i = 1; i <= 6; i++) {
      const s = mk({ t: i * 200, refaultFile: i * 500 });
      const d = postcopyDecision(current, assessPressure(s, before), BOUNDS);
      if (d.targetBytes !== undefined) current = d.targetBytes;
      seen.push(current / MiB);
      before = s;
    }
    expect(seen).toEqual([593, 721, 849, 977, 1024, 1024]);
  });

  it("incomplete sample: hold", () => {
    expect(postcopyDecision(465 * MiB, undefined, BOUNDS).targetBytes).toBeUndefined();
  });
});

describe("restore after COMPLETED / FAILED / CANCELLED", () => {
  const e = estimateMemory(mk(), RAM); // steady raw 475
  it.each([
    ["steady on: max(steady estimate, before PREPARE)", { steadyState: true, estimate: e, targetBeforePrepareBytes: 700 * MiB }, 465, 700],
    ["steady on, estimate above before", { steadyState: true, estimate: e, targetBeforePrepareBytes: 400 * MiB }, 465, 475],
    ["steady off: back to before PREPARE", { steadyState: false, estimate: e, targetBeforePrepareBytes: 900 * MiB }, 465, 900],
    ["steady off, before unknown: fully deflated", { steadyState: false, estimate: e }, 465, 1024],
    ["incomplete sample: before PREPARE", { steadyState: true, targetBeforePrepareBytes: 800 * MiB }, 465, 800],
    ["never shrinks on restore", { steadyState: true, estimate: e, targetBeforePrepareBytes: 500 * MiB }, 900, undefined],
  ] as const)("%s", (_, input, current, want) => {
    const d = restoreDecision({ ...input, currentBytes: current * MiB }, BOUNDS);
    expect(d.reason).toBe("restore");
    expect(mib(d.targetBytes)).toBe(want);
  });
});
