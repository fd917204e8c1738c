// The runtime state machine: (state, input) -> (state, effects), driven through whole migrations.
import { describe, expect, it } from "vitest";
import { Phase } from "../../gen/ballast/v1/common_pb.js";
import {
  DEFAULT_RUNTIME_OPTIONS,
  initialState,
  onBalloonState,
  onPhaseEvent,
  onPolicy,
  reportDue,
  onTick,
  onWelcome,
  sampleIntervalMs,
  type Effect,
  type ReportContext,
  type RuntimeState,
} from "../../agent/runtime.js";
import type { Sample } from "../../agent/sample.js";

const MiB = 1024 * 1024;

interface Shape {
  free: number;
  avail: number;
  activeFile: number;
  inactiveFile: number;
  psiSome: number;
  refaultFile: number;
  t: number;
}

// A 1 GiB guest with 500 MiB of cold cache: PREPARE target = base 241 + hot 30 + wmark 66 + reserve 128 = 465 MiB.
function mk(s: Partial<Shape> = {}): Sample {
  const x: Shape = { free: 243, avail: 700, activeFile: 40, inactiveFile: 500, psiSome: 0, refaultFile: 0, t: 0, ...s };
  return {
    timestampMs: 1_700_000_000_000 + x.t,
    monotonicMs: x.t,
    meminfo: {
      memTotal: 959 * MiB,
      memFree: x.free * MiB,
      memAvailable: x.avail * MiB,
      buffers: 0,
      cached: (x.activeFile + x.inactiveFile) * MiB,
      activeFile: x.activeFile * MiB,
      inactiveFile: x.inactiveFile * MiB,
      anonPages: 150 * MiB,
      mapped: 30 * MiB,
      shmem: 0,
      dirty: 0,
      writeback: 0,
      swapTotal: 0,
      swapFree: 0,
    },
    vmstat: { pgmajfault: 1, workingsetRefaultFile: x.refaultFile, workingsetRefaultAnon: 0, pswpin: 0, pswpout: 0, oomKill: 0 },
    psi: { some: { avg10: x.psiSome, avg60: 0, avg300: 0, totalUs: 0 }, full: { avg10: 0, avg60: 0, avg300: 0, totalUs: 0 } },
    watermarks: { minFreeBytes: 44 * MiB, highBytes: 66 * MiB, source: "zoneinfo" },
    balloon: { bytes: 0, source: "vmstat-counters", deflateOnOom: true },
  };
}

const NOW = 1_700_000_000_000;
const DEFAULTS = DEFAULT_RUNTIME_OPTIONS;
const POLICY = { floorBytes: 300 * MiB, maxBytes: 1024 * MiB, sampleIntervalMs: 2000, steadyState: false };

function attached(steadyState = false): RuntimeState {
  let s = onPolicy(initialState(), { ...POLICY, steadyState });
  s = onBalloonState(s, { targetBytes: 1024 * MiB, actualBytes: 1024 * MiB, ramBytes: 1024 * MiB });
  return s;
}

const kinds = (effects: Effect[]) => effects.filter((e) => e.kind !== "log").map((e) => e.kind);
const balloons = (effects: Effect[]) => effects.flatMap((e) => (e.kind === "balloon" ? [{ target: e.targetBytes / MiB, reason: e.reason, migrationId: e.migrationId }] : []));
const acks = (effects: Effect[]) => effects.flatMap((e) => (e.kind === "ack" ? [{ phase: e.phase, target: e.targetBytes / MiB, migrationId: e.migrationId }] : []));
const ev = (phase: Phase, extra: { deadlineUnixMs?: number; migrationId?: string } = {}) => ({ migrationId: extra.migrationId ?? "m1", phase, pass: 0, ...extra });

describe("PREPARE", () => {
  it("reclaims cache, then asks for the PREPARE target, then acks it in the same step", () => {
    const step = onPhaseEvent(attached(), ev(Phase.PREPARE, { deadlineUnixMs: NOW + 15_000 }), mk(), NOW);
    expect(kinds(step.effects)).toEqual(["reclaim", "balloon", "ack"]);
    expect(step.effects.find((e) => e.kind === "reclaim")).toMatchObject({ bytes: 382 * MiB, budgetMs: 3000 });
    expect(balloons(step.effects)).toEqual([{ target: 465, reason: "prepare", migrationId: "m1" }]);
    expect(acks(step.effects)).toEqual([{ phase: Phase.PREPARE, target: 465, migrationId: "m1" }]);
    expect(step.state).toMatchObject({ phase: "migrating", migrationId: "m1", currentTargetBytes: 465 * MiB, targetBeforePrepareBytes: 1024 * MiB });
  });

  it.each([
    ["drop caches disabled", { ...DEFAULTS, dropCaches: false }, NOW + 15_000],
    ["deadline too close", DEFAULTS, NOW + 400],
  ])("no reclaim when %s", (_, options, deadline) => {
    const step = onPhaseEvent(attached(), ev(Phase.PREPARE, { deadlineUnixMs: deadline }), mk(), NOW, options);
    expect(kinds(step.effects)).toEqual(["balloon", "ack"]);
  });

  it("the reclaim budget ends before the deadline", () => {
    const step = onPhaseEvent(attached(), ev(Phase.PREPARE, { deadlineUnixMs: NOW + 1500 }), mk(), NOW);
    expect(step.effects.find((e) => e.kind === "reclaim")).toMatchObject({ budgetMs: 1000 });
  });

  it("never below the Policy floor", () => {
    const s = onPolicy(attached(), { ...POLICY, floorBytes: 600 * MiB });
    expect(balloons(onPhaseEvent(s, ev(Phase.PREPARE), mk(), NOW).effects)[0]?.target).toBe(600);
  });

  it("an incomplete sample gives nothing back: PREPARE request for the current target, so the coordinator need not wait", () => {
    const s = onBalloonState(attached(), { targetBytes: 800 * MiB, actualBytes: 800 * MiB, ramBytes: 1024 * MiB });
    const step = onPhaseEvent(s, ev(Phase.PREPARE), undefined, NOW);
    expect(kinds(step.effects)).toEqual(["balloon", "ack"]);
    expect(balloons(step.effects)).toEqual([{ target: 800, reason: "prepare", migrationId: "m1" }]);
    expect(acks(step.effects)[0]?.target).toBe(800);
    expect(step.state.phase).toBe("migrating");
  });

  it("an incomplete sample and no known target: ack 0, no request", () => {
    const step = onPhaseEvent(onPolicy(initialState(), POLICY), ev(Phase.PREPARE), undefined, NOW);
    expect(kinds(step.effects)).toEqual(["ack"]);
    expect(acks(step.effects)[0]?.target).toBe(0);
  });

  it("under pressure grows instead, without reclaiming", () => {
    let s = onBalloonState(attached(), { targetBytes: 500 * MiB, actualBytes: 500 * MiB, ramBytes: 1024 * MiB });
    s = onTick(s, mk({ t: 0 })).state;
    const step = onPhaseEvent(s, ev(Phase.PREPARE), mk({ t: 1000, psiSome: 30 }), NOW);
    expect(balloons(step.effects)).toEqual([{ target: 628, reason: "prepare", migrationId: "m1" }]);
    expect(kinds(step.effects)).not.toContain("reclaim");
  });

  it("a repeated PREPARE (re-attach to the same host) re-acks without reclaiming again or forgetting the old target", () => {
    const first = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW);
    const again = onWelcome(first.state, ev(Phase.PREPARE), mk(), NOW + 1000);
    expect(kinds(again.effects)).toEqual(["balloon", "ack"]);
    expect(again.state.targetBeforePrepareBytes).toBe(1024 * MiB);
  });

  it("pressure while migrating after PREPARE: grows on the tick, never a second PREPARE ack", () => {
    let s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    s = onTick(s, mk({ t: 0 })).state;
    const step = onTick(s, mk({ t: 1000, refaultFile: 2000 }));
    expect(kinds(step.effects)).toEqual(["report", "balloon"]);
    expect(balloons(step.effects)).toEqual([{ target: 465 + 128, reason: "demand", migrationId: "m1" }]);
  });
});

describe("a whole pre-copy migration", () => {
  it("PREPARE -> passes and switchover hold -> COMPLETED restores", () => {
    let s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    for (const phase of [Phase.PRECOPY_PASS, Phase.PRECOPY_PASS, Phase.SWITCHOVER]) {
      const step = onPhaseEvent(s, ev(phase), mk(), NOW);
      expect(kinds(step.effects)).toEqual(["ack"]);
      s = step.state;
    }
    // Holding: a quiet tick never moves the balloon while migrating, even with a low estimate (it only reports the sample).
    const tick = onTick(s, mk({ t: 1000, free: 800, inactiveFile: 0 }));
    expect(kinds(tick.effects)).toEqual(["report"]);
    const done = onPhaseEvent(tick.state, ev(Phase.COMPLETED), mk(), NOW);
    expect(balloons(done.effects)).toEqual([{ target: 1024, reason: "restore", migrationId: "m1" }]);
    expect(acks(done.effects)).toEqual([{ phase: Phase.COMPLETED, target: 1024, migrationId: "m1" }]);
    expect(done.state).toMatchObject({ phase: "steady", migrationId: "" });
    expect(done.state.targetBeforePrepareBytes).toBeUndefined();
  });

  it.each([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED])("phase %i restores to the target before PREPARE (steady state off)", (phase) => {
    const s = onBalloonState(attached(), { targetBytes: 900 * MiB, actualBytes: 900 * MiB, ramBytes: 1024 * MiB });
    const prepared = onPhaseEvent(s, ev(Phase.PREPARE), mk(), NOW).state;
    const step = onPhaseEvent(prepared, ev(phase), mk(), NOW);
    expect(balloons(step.effects)).toEqual([{ target: 900, reason: "restore", migrationId: "m1" }]);
    expect(step.state.phase).toBe("steady");
  });

  it("steady state on: restore to max(steady estimate, before PREPARE)", () => {
    const s = onBalloonState(attached(true), { targetBytes: 400 * MiB, actualBytes: 400 * MiB, ramBytes: 1024 * MiB });
    const prepared = onPhaseEvent(s, ev(Phase.PREPARE), mk(), NOW).state;
    // steady raw = 241 + 40 + 66 + 128 = 475 > 400 before PREPARE
    expect(balloons(onPhaseEvent(prepared, ev(Phase.CANCELLED), mk(), NOW).effects)[0]).toMatchObject({ target: 475, reason: "restore" });
  });

  it("pressure while migrating grows at once (reason demand)", () => {
    let s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    s = onTick(s, mk({ t: 0 })).state;
    const step = onTick(s, mk({ t: 1000, refaultFile: 2000 }));
    expect(balloons(step.effects)).toEqual([{ target: 465 + 128, reason: "demand", migrationId: "m1" }]);
  });
});

describe("post-copy", () => {
  function postcopy(): RuntimeState {
    const s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    return onPhaseEvent(s, ev(Phase.POSTCOPY_ACTIVE), mk(), NOW).state;
  }

  it("samples fast, deflates on demand step by step, holds when quiet", () => {
    let s = postcopy();
    expect(sampleIntervalMs(s)).toBe(200);
    const targets: Array<number | undefined> = [];
    const shapes: Array<Partial<Shape>> = [
      { t: 0 },
      { t: 200, psiSome: 25 },
      { t: 400, psiSome: 25 },
      { t: 600 },
      { t: 800, avail: 20 },
      { t: 1000, refaultFile: 1000 },
      { t: 1200, refaultFile: 1000 },
    ];
    for (const shape of shapes) {
      const step = onTick(s, mk(shape));
      targets.push(balloons(step.effects)[0]?.target);
      expect(balloons(step.effects).every((b) => b.reason === "demand")).toBe(true);
      s = step.state;
    }
    // PSI avg10 stays high for a while after the stall: two steps; quiet: hold; low MemAvailable: step; refaults: step; then quiet.
    expect(targets).toEqual([undefined, 593, 721, undefined, 849, 977, undefined]);
  });

  it("after the migration completes: back to the steady interval and target", () => {
    const done = onPhaseEvent(postcopy(), ev(Phase.COMPLETED), mk(), NOW);
    expect(sampleIntervalMs(done.state)).toBe(2000);
    expect(balloons(done.effects)[0]).toMatchObject({ reason: "restore", target: 1024 });
  });

  it("re-attach on the destination: Welcome.current_phase POSTCOPY_ACTIVE enters post-copy", () => {
    const s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    const step = onWelcome(s, ev(Phase.POSTCOPY_ACTIVE), mk(), NOW);
    expect(step.state.phase).toBe("postcopy");
    expect(acks(step.effects)).toEqual([{ phase: Phase.POSTCOPY_ACTIVE, target: 0, migrationId: "m1" }]);
  });

  it("a Welcome with no migration while the agent was in one: restore", () => {
    const s = onPhaseEvent(attached(), ev(Phase.PREPARE), mk(), NOW).state;
    const step = onWelcome(s, undefined, mk(), NOW);
    expect(step.state.phase).toBe("steady");
    expect(balloons(step.effects)).toEqual([{ target: 1024, reason: "restore", migrationId: "m1" }]);
    expect(acks(step.effects)).toEqual([]);
  });

  it("knowing nothing (no sample, no BalloonState, no RAM): restore asks for nothing rather than guess", () => {
    const s = onPhaseEvent(onPolicy(initialState(), POLICY), ev(Phase.PREPARE), undefined, NOW).state;
    const step = onPhaseEvent(s, ev(Phase.COMPLETED), undefined, NOW);
    expect(kinds(step.effects)).toEqual(["ack"]);
    expect(acks(step.effects)[0]?.target).toBe(0);
    expect(step.state.phase).toBe("steady");
  });

  it("a Welcome with no migration while steady: nothing", () => {
    expect(onWelcome(attached(), undefined, mk(), NOW).effects).toEqual([]);
  });
});

describe("reporting samples: decide every interval, report every 5 s or when something changed", () => {
  const last = { monotonicMs: 10_000, memAvailableBytes: 700 * MiB };
  const quiet: ReportContext = { phase: "steady", underPressure: false, requests: false, intervalMs: 1000 };
  it.each<[string, Parameters<typeof reportDue>[0], Partial<Shape>, Partial<ReportContext>, string | undefined]>([
    ["the first sample of an attach", undefined, { t: 10_000 }, {}, "first sample"],
    ["1 s later, nothing changed", last, { t: 11_000 }, {}, undefined],
    ["4 s later", last, { t: 14_000 }, {}, undefined],
    ["4.6 s later (timer jitter: half an interval early is on time)", last, { t: 14_600 }, {}, "period"],
    ["5 s later", last, { t: 15_000 }, {}, "period"],
    ["MemAvailable moved 40 MiB", last, { t: 11_000, avail: 660 }, {}, "MemAvailable moved"],
    ["MemAvailable moved 30 MiB", last, { t: 11_000, avail: 730 }, {}, undefined],
    ["pressure", last, { t: 11_000 }, { underPressure: true }, "pressure"],
    ["a balloon request", last, { t: 11_000 }, { requests: true }, "balloon request"],
    ["migrating", last, { t: 11_000 }, { phase: "migrating" }, "migrating"],
    ["post-copy (200 ms interval)", last, { t: 10_200 }, { phase: "postcopy", intervalMs: 200 }, "postcopy"],
  ])("%s", (_, prev, shape, ctx, want) => {
    expect(reportDue(prev, mk(shape), { ...quiet, ...ctx })).toBe(want);
  });

  it("on a big machine a MemAvailable move must be 2 % of MemTotal to count", () => {
    const big = mk({ t: 11_000, avail: 660 });
    big.meminfo.memTotal = 24 * 1024 * MiB;
    expect(reportDue(last, big, quiet)).toBeUndefined();
    big.meminfo.memAvailable = (700 - 500) * MiB;
    expect(reportDue(last, big, quiet)).toBe("MemAvailable moved");
  });

  it("reportEveryMs 0 reports every sample", () => {
    expect(reportDue(last, mk({ t: 10_100 }), quiet, { ...DEFAULT_RUNTIME_OPTIONS, reportEveryMs: 0 })).toBe("period");
  });

  it("a steady guest at 1 Hz: samples 0, 5, 10 reported; a report goes before the balloon request it explains", () => {
    let s = onPolicy(onBalloonState(attached(), { targetBytes: 600 * MiB, actualBytes: 600 * MiB, ramBytes: 1024 * MiB }), { ...POLICY, sampleIntervalMs: 1000 });
    const reported: number[] = [];
    for (let i = 0; i <= 10; i++) {
      const step = onTick(s, mk({ t: i * 1000 }));
      if (kinds(step.effects).includes("report")) reported.push(i);
      s = step.state;
    }
    expect(reported).toEqual([0, 5, 10]);
    const step = onTick(s, mk({ t: 11_000, psiSome: 40 }));
    expect(kinds(step.effects)).toEqual(["report", "balloon"]);
    const report = step.effects[0];
    expect(report).toMatchObject({ kind: "report", why: "pressure" });
    if (report?.kind !== "report") throw new Error("unreachable");
    expect(report.estimate?.ramBytes).toBe(1024 * MiB);
  });

  it("an incomplete sample reports nothing; a Welcome (new coordinator) makes the next sample report at once", () => {
    let s = onTick(attached(), mk({ t: 0 })).state;
    expect(kinds(onTick(s, undefined).effects)).toEqual([]);
    s = onWelcome(s, undefined, mk({ t: 500 }), NOW).state;
    expect(kinds(onTick(s, mk({ t: 1000 })).effects)).toEqual(["report"]);
  });
});

describe("steady state", () => {
  it("off (Policy.steady_state false): no self-ballooning, but pressure still grows the guest", () => {
    let s = onBalloonState(attached(false), { targetBytes: 600 * MiB, actualBytes: 600 * MiB, ramBytes: 1024 * MiB });
    for (let i = 0; i < 10; i++) {
      const step = onTick(s, mk({ t: i * 1000, free: 600 }));
      expect(balloons(step.effects)).toEqual([]);
      s = step.state;
    }
    expect(balloons(onTick(s, mk({ t: 10_000, psiSome: 50 })).effects)).toEqual([{ target: 728, reason: "demand", migrationId: "" }]);
  });

  it("on: shrinks slowly towards the estimate after it held", () => {
    let s = attached(true);
    const targets: Array<number | undefined> = [];
    for (let i = 0; i < 7; i++) {
      const step = onTick(s, mk({ t: i * 1000 }));
      targets.push(balloons(step.effects)[0]?.target);
      s = step.state;
    }
    expect(targets).toEqual([undefined, undefined, undefined, undefined, 992, 960, 928]);
  });

  it("an incomplete sample never shrinks and restarts the hold count", () => {
    let s = attached(true);
    for (let i = 0; i < 4; i++) s = onTick(s, mk({ t: i * 1000 })).state;
    const gap = onTick(s, undefined);
    expect(gap.effects).toEqual([]);
    expect(gap.state.tracker.belowCount).toBe(0);
    expect(balloons(onTick(gap.state, mk({ t: 5000 })).effects)).toEqual([]);
  });

  it("uses the Policy interval, else the configured default", () => {
    expect(sampleIntervalMs(attached())).toBe(2000);
    expect(sampleIntervalMs(initialState())).toBe(1000);
  });
});
