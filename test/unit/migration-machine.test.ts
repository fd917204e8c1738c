/**
 * Table tests of the pure migration machine: no sockets, no VM, a fake
 * clock carried in the events. Each case feeds a sequence of events and
 * checks the effects and the final state.
 */
import { describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import * as m from "../../coordinator/migration-machine.js";

type Ev = m.MachineEvent;
const T = { lossMs: 5000, pollMs: 500, cancelWaitMs: 10_000, recoverEveryMs: 2000 };

function params(over: Partial<m.MachineParams> = {}): Omit<m.MachineParams, "direction"> {
  return { id: "m1", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 10_000, postcopyAfterPasses: 2, ...over };
}

/** Feeds events in order; returns the last state and every effect, flattened. */
function feed(state: m.MachineState, events: Ev[]): { state: m.MachineState; effects: m.Effect[] } {
  const effects: m.Effect[] = [];
  let s = state;
  for (const ev of events) {
    const t = m.step(s, ev);
    s = t.state;
    effects.push(...t.effects);
  }
  return { state: s, effects };
}

const types = (fx: m.Effect[]) => fx.map((e) => e.type);
const phases = (fx: m.Effect[]) => fx.filter((e): e is Extract<m.Effect, { type: "phase" }> => e.type === "phase").map((e) => Phase[e.phase]);
const finalOf = (fx: m.Effect[]) => fx.find((e): e is Extract<m.Effect, { type: "final" }> => e.type === "final");

/** Events that take an outgoing machine up to "migrate accepted" without PREPARE. */
const upToRunning = (now = 0): Ev[] => [
  { type: "begin", now },
  { type: "vm-checked", now, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
  { type: "destination-ready", now, uri: "tcp:127.0.0.1:1" },
  { type: "configured", now },
  { type: "migrate-accepted", now },
];
const noPrepare = () => m.outgoing(params({ strategy: BalloonStrategy.NONE }), T);

describe("outgoing, the happy paths", () => {
  it("pre-copy without PREPARE: check, destination, configure, migrate, phases, stats, done", () => {
    const { state, effects } = feed(noPrepare(), [
      ...upToRunning(),
      { type: "status", now: 10, status: "active" },
      { type: "pass", now: 20, pass: 2 },
      { type: "guest-stopped", now: 30 },
      { type: "status", now: 40, status: "completed" },
      { type: "stats-done", now: 50 },
    ]);
    expect(types(effects).slice(0, 5)).toEqual(["check-vm", "prepare-destination", "configure", "migrate", "migrate-issued"]);
    expect(phases(effects)).toEqual(["PRECOPY_PASS", "PRECOPY_PASS", "SWITCHOVER", "COMPLETED"]);
    expect(finalOf(effects)).toEqual({ type: "final", phase: Phase.COMPLETED, error: "" });
    // A completed migration never restores the source's balloon.
    expect(types(effects)).not.toContain("restore-balloon");
    expect(m.isDone(state)).toBe(true);
  });

  it("refuses a VM that is not running", () => {
    const { effects } = feed(noPrepare(), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "paused", balloonTargetBytes: 1024, agentAttached: false },
      { type: "stats-done", now: 1 },
      { type: "restored", now: 2 },
    ]);
    expect(finalOf(effects)?.error).toMatch(/paused, not running/);
    expect(finalOf(effects)?.phase).toBe(Phase.FAILED);
    expect(types(effects)).not.toContain("prepare-destination");
  });

  it("PREPARE: waits for the agent's target and the inflation, then migrates", () => {
    const { effects, state } = feed(m.outgoing(params(), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 100 },
      { type: "tick", now: 1000 },
      { type: "prepare-requested", now: 1200 },
      { type: "tick", now: 2000 },
      { type: "balloon-settled", now: 3100 },
    ]);
    const prepare = effects.find((e) => e.type === "phase");
    expect(prepare).toEqual({ type: "phase", phase: Phase.PREPARE, pass: 0, deadlineUnixMs: 10_100 });
    expect(effects).toContainEqual({ type: "wait-balloon", untilMs: 10_100 });
    expect(effects).toContainEqual({ type: "timing", prepareMs: 3000 });
    expect(types(effects).at(-1)).toBe("migrate");
    expect(state.step).toBe("migrate");
  });

  it("PREPARE ends at its deadline: the balloon never fails a migration", () => {
    const { effects, state } = feed(m.outgoing(params({ prepareDeadlineMs: 5000 }), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 0 },
      { type: "tick", now: 4999 },
    ]);
    expect(types(effects)).not.toContain("migrate");
    const after = m.step(state, { type: "tick", now: 5000 });
    expect(types(after.effects)).toEqual(["timing", "migrate"]);
  });

  it("PREPARE: an agent that leaves before asking does not hold the migration", () => {
    const { effects } = feed(m.outgoing(params(), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 0 },
      { type: "agent-detached", now: 700 },
    ]);
    expect(types(effects).at(-1)).toBe("migrate");
  });

  it("overlap: PREPARE is announced and migrate is issued at once", () => {
    const { effects } = feed(m.outgoing(params({ strategy: BalloonStrategy.OVERLAP }), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 0 },
    ]);
    expect(phases(effects)).toEqual(["PREPARE"]);
    expect(types(effects).at(-1)).toBe("migrate");
  });

  it("post-copy: switches as soon as the first pass runs, once", () => {
    const { effects } = feed(m.outgoing(params({ mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE }), T), [
      ...upToRunning(),
      { type: "status", now: 1, status: "active" },
      { type: "status", now: 2, status: "active" },
      { type: "status", now: 3, status: "postcopy-active" },
    ]);
    expect(types(effects).filter((t) => t === "start-postcopy")).toHaveLength(1);
    expect(phases(effects)).toEqual(["PRECOPY_PASS", "POSTCOPY_ACTIVE"]);
  });

  it("hybrid: switches only after postcopyAfterPasses passes", () => {
    const s0 = feed(m.outgoing(params({ mode: MigrationMode.HYBRID, strategy: BalloonStrategy.NONE, postcopyAfterPasses: 2 }), T), [
      ...upToRunning(),
      { type: "status", now: 1, status: "active" },
      { type: "pass", now: 2, pass: 1 },
      { type: "pass", now: 3, pass: 2 },
    ]);
    expect(types(s0.effects)).not.toContain("start-postcopy");
    const s1 = m.step(s0.state, { type: "pass", now: 4, pass: 3 });
    expect(types(s1.effects)).toContain("start-postcopy");
    expect(s1.state.postcopyRequested).toBe(true);
  });

  it("pre-copy mode never asks for post-copy", () => {
    const { effects } = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "active" }, { type: "pass", now: 2, pass: 9 }]);
    expect(types(effects)).not.toContain("start-postcopy");
  });

  it("polls query-migrate on ticks while running, not more often than pollMs", () => {
    const { effects } = feed(noPrepare(), [...upToRunning(0), { type: "tick", now: 250 }, { type: "tick", now: 500 }, { type: "tick", now: 750 }, { type: "tick", now: 1000 }]);
    expect(types(effects).filter((t) => t === "poll")).toHaveLength(2);
  });
});

describe("outgoing, failures", () => {
  it("a destination that refuses fails the migration and restores the balloon", () => {
    const { effects, state } = feed(noPrepare(), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 900, agentAttached: false },
      { type: "failed", now: 5, error: "destination 127.0.0.1:1 is not ready: no VM named vm1" },
      { type: "stats-done", now: 6 },
      { type: "restored", now: 7 },
    ]);
    expect(effects).toContainEqual({ type: "restore-balloon", targetBytes: 900 });
    expect(finalOf(effects)).toEqual({ type: "final", phase: Phase.FAILED, error: "destination 127.0.0.1:1 is not ready: no VM named vm1" });
    // Nothing was issued to QEMU, so nothing to cancel there.
    expect(types(effects)).not.toContain("cancel-qemu");
    expect(m.isDone(state)).toBe(true);
  });

  it("QEMU's own failure: no cancel sent, balloon restored", () => {
    const { effects } = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "failed" }, { type: "stats-done", now: 2 }, { type: "restored", now: 3 }]);
    expect(types(effects)).not.toContain("cancel-qemu");
    expect(effects).toContainEqual({ type: "restore-balloon", targetBytes: 1024 });
    expect(finalOf(effects)?.error).toMatch(/failed/);
  });

  it("a stale final status before `migrate` was accepted is ignored", () => {
    const s = feed(noPrepare(), [...upToRunning().slice(0, 4), { type: "hypervisor-up", now: 1 }, { type: "status", now: 2, status: "completed" }]);
    expect(s.state.outcome).toBeUndefined();
    expect(s.state.step).toBe("migrate");
  });

  it("an error of ours after migrate was issued cancels QEMU's migration", () => {
    const { effects } = feed(noPrepare(), [...upToRunning(), { type: "failed", now: 3, error: "boom" }]);
    expect(types(effects)).toContain("cancel-qemu");
  });

  it("status none after migrate was accepted means QEMU was restarted: FAILED at once", () => {
    const { effects } = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "active" }, { type: "status", now: 2, status: "none" }]);
    const st = feed(noPrepare(), [...upToRunning(), { type: "status", now: 2, status: "none" }, { type: "stats-done", now: 3 }, { type: "restored", now: 4 }]);
    expect(finalOf(st.effects)?.error).toMatch(/restarted mid-migration/);
    expect(types(effects)).toContain("collect-stats");
  });

  it("hypervisor lost mid-migration: FAILED after lossMs, not before, with the cleanup left for its return", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "active" }, { type: "hypervisor-down", now: 1000, error: "closed" }, { type: "tick", now: 5999 }]);
    expect(s.state.outcome).toBeUndefined();
    const t = m.step(s.state, { type: "tick", now: 6000 });
    expect(t.effects).toContainEqual({ type: "cleanup-later", cancelQemu: true, restoreBalloonBytes: 1024 });
    expect(finalOf(t.effects)?.error).toMatch(/lost the connection to the source hypervisor mid-migration for 5000 ms/);
    expect(m.isDone(t.state)).toBe(true);
    // No poll was sent while the hypervisor was away.
    expect(types(s.effects.slice(-1))).not.toContain("poll");
  });

  it("hypervisor back within lossMs: asks QEMU where it is and carries on", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "hypervisor-down", now: 1000, error: "x" }, { type: "hypervisor-up", now: 3000 }, { type: "tick", now: 7000 }]);
    expect(types(s.effects)).toContain("query-status");
    expect(s.state.outcome).toBeUndefined();
  });
});

describe("cancel in every phase", () => {
  const cases: Array<{ name: string; events: Ev[]; strategy?: BalloonStrategy; expectCancelQemu: boolean }> = [
    { name: "before the destination answered", events: [{ type: "begin", now: 0 }, { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 700, agentAttached: true }], expectCancelQemu: false },
    {
      name: "during PREPARE",
      strategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
      events: [
        { type: "begin", now: 0 },
        { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 700, agentAttached: true },
        { type: "destination-ready", now: 0, uri: "u" },
        { type: "configured", now: 0 },
        { type: "prepare-requested", now: 1 },
      ],
      expectCancelQemu: false,
    },
    {
      name: "during a pre-copy pass",
      events: [
        { type: "begin", now: 0 },
        { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 700, agentAttached: true },
        { type: "destination-ready", now: 0, uri: "u" },
        { type: "configured", now: 0 },
        { type: "migrate-accepted", now: 0 },
        { type: "status", now: 1, status: "active" },
      ],
      expectCancelQemu: true,
    },
  ];
  for (const c of cases) {
    it(`${c.name}: CANCELLED and the balloon restored`, () => {
      const s = feed(m.outgoing(params({ strategy: c.strategy ?? BalloonStrategy.NONE }), T), c.events);
      expect(m.cancelVerdict(s.state)).toEqual({ ok: true });
      const afterCancel = feed(s.state, [{ type: "cancel", now: 10 }]);
      expect(types(afterCancel.effects).includes("cancel-qemu")).toBe(c.expectCancelQemu);
      const end = feed(afterCancel.state, [...(c.expectCancelQemu ? [{ type: "status", now: 20, status: "cancelled" } as Ev] : []), { type: "stats-done", now: 30 }, { type: "restored", now: 40 }]);
      expect(end.effects).toContainEqual({ type: "restore-balloon", targetBytes: 700 });
      expect(finalOf(end.effects)).toEqual({ type: "final", phase: Phase.CANCELLED, error: "cancelled by request" });
    });
  }

  it("while `migrate` is in flight: the cancel is sent once QEMU accepted it", () => {
    const s = feed(noPrepare(), [...upToRunning().slice(0, 4), { type: "cancel", now: 1 }]);
    expect(types(s.effects)).not.toContain("cancel-qemu");
    const t = m.step(s.state, { type: "migrate-accepted", now: 2 });
    expect(types(t.effects)).toEqual(["migrate-issued", "cancel-qemu"]);
  });

  it("in post-copy: refused with the reason, and the migration goes on", () => {
    const s = feed(m.outgoing(params({ mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE }), T), [...upToRunning(), { type: "status", now: 1, status: "postcopy-active" }]);
    const v = m.cancelVerdict(s.state);
    expect(v.ok).toBe(false);
    expect(v.ok ? "" : v.why).toMatch(/post-copy.*runs on the destination/);
    const t = m.step(s.state, { type: "cancel", now: 2 });
    expect(t.effects).toEqual([]);
    expect(t.state.cancelRequested).toBe(false);
  });

  it("after post-copy was requested but before QEMU switched: refused too", () => {
    const s = feed(m.outgoing(params({ mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE }), T), [...upToRunning(), { type: "status", now: 1, status: "active" }]);
    expect(s.state.postcopyRequested).toBe(true);
    expect(m.cancelVerdict(s.state).ok).toBe(false);
  });

  it("after the end: refused", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "completed" }, { type: "stats-done", now: 2 }]);
    const v = m.cancelVerdict(s.state);
    expect(v).toEqual({ ok: false, why: "migration m1 is already over" });
  });

  it("QEMU never confirms the cancel: CANCELLED after cancelWaitMs", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "active" }, { type: "cancel", now: 100 }, { type: "tick", now: 10_099 }]);
    expect(s.state.outcome).toBeUndefined();
    const t = m.step(s.state, { type: "tick", now: 10_100 });
    expect(t.state.outcome?.phase).toBe(Phase.CANCELLED);
    expect(t.state.outcome?.error).toMatch(/did not confirm within 10000 ms/);
  });

  it("with the hypervisor away: answers at once, CANCELLED, cleanup left for later", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "hypervisor-down", now: 5, error: "x" }, { type: "cancel", now: 10 }]);
    expect(s.state.outcome?.phase).toBe(Phase.CANCELLED);
    expect(s.effects).toContainEqual({ type: "cleanup-later", cancelQemu: true, restoreBalloonBytes: 1024 });
    expect(m.isDone(s.state)).toBe(true);
  });
});

describe("resume after a coordinator restart", () => {
  const rec = (over: Partial<{ phase: Phase; pass: number; migrateIssued: boolean; balloonBeforeBytes: number }> = {}) => ({
    phase: Phase.PRECOPY_PASS,
    pass: 2,
    migrateIssued: true,
    balloonBeforeBytes: 800,
    ...over,
  });
  const resumed = (r = rec(), direction: "outgoing" | "incoming" = "outgoing") => m.resumed({ ...params({ strategy: BalloonStrategy.NONE }), direction }, r, 0, T);

  it("QEMU still migrating: tracks it to its end", () => {
    const s = feed(resumed(), [{ type: "hypervisor-up", now: 100 }, { type: "status", now: 110, status: "active" }, { type: "status", now: 2000, status: "completed" }, { type: "stats-done", now: 2100 }]);
    expect(types(s.effects)[0]).toBe("query-status");
    expect(finalOf(s.effects)?.phase).toBe(Phase.COMPLETED);
  });

  it("QEMU in post-copy: tracks it, and cancel is refused", () => {
    const s = feed(resumed(rec({ phase: Phase.POSTCOPY_ACTIVE })), [{ type: "hypervisor-up", now: 100 }, { type: "status", now: 110, status: "postcopy-active" }]);
    expect(s.state.step).toBe("running");
    expect(m.cancelVerdict(s.state).ok).toBe(false);
  });

  it("QEMU completed while we were down: COMPLETED, no restore", () => {
    const s = feed(resumed(), [{ type: "hypervisor-up", now: 100 }, { type: "status", now: 110, status: "completed" }, { type: "stats-done", now: 120 }]);
    expect(finalOf(s.effects)?.phase).toBe(Phase.COMPLETED);
    expect(types(s.effects)).not.toContain("restore-balloon");
  });

  it("restarted during PREPARE, QEMU has no migration: FAILED and the balloon restored", () => {
    const s = feed(resumed(rec({ phase: Phase.PREPARE, migrateIssued: false })), [
      { type: "hypervisor-up", now: 100 },
      { type: "status", now: 110, status: "none" },
      { type: "stats-done", now: 120 },
      { type: "restored", now: 130 },
    ]);
    expect(finalOf(s.effects)?.error).toMatch(/restarted before the migration started/);
    expect(s.effects).toContainEqual({ type: "restore-balloon", targetBytes: 800 });
  });

  it("restarted during PREPARE: an old migration's final status in QEMU does not count as ours", () => {
    const s = feed(resumed(rec({ phase: Phase.PREPARE, migrateIssued: false })), [{ type: "hypervisor-up", now: 1 }, { type: "status", now: 2, status: "completed" }, { type: "stats-done", now: 3 }, { type: "restored", now: 4 }]);
    expect(finalOf(s.effects)?.phase).toBe(Phase.FAILED);
    expect(s.effects).toContainEqual({ type: "restore-balloon", targetBytes: 800 });
  });

  it("QEMU failed while we were down: FAILED, balloon restored", () => {
    const s = feed(resumed(), [{ type: "hypervisor-up", now: 1 }, { type: "status", now: 2, status: "failed" }, { type: "stats-done", now: 3 }]);
    expect(s.effects).toContainEqual({ type: "restore-balloon", targetBytes: 800 });
  });

  it("the hypervisor never comes back: FAILED after lossMs, cleanup left for later", () => {
    const s = feed(resumed(), [{ type: "tick", now: 4999 }]);
    expect(s.state.outcome).toBeUndefined();
    const t = m.step(s.state, { type: "tick", now: 5000 });
    expect(finalOf(t.effects)?.error).toMatch(/after the coordinator restarted/);
    expect(t.effects).toContainEqual({ type: "cleanup-later", cancelQemu: true, restoreBalloonBytes: 800 });
  });

  it("cancel while recovering and the hypervisor is away: answers at once", () => {
    const s = feed(resumed(), [{ type: "cancel", now: 10 }]);
    expect(s.state.outcome?.phase).toBe(Phase.CANCELLED);
  });
});

describe("incoming", () => {
  const inc = (mode = MigrationMode.PRECOPY) => m.incoming(params({ mode, strategy: BalloonStrategy.NONE }), 0, T);

  it("a destination reports no status until the source connects: not a failure", () => {
    const s = feed(inc(), [{ type: "tick", now: 600 }, { type: "status", now: 610, status: "none" }, { type: "status", now: 700, status: "setup" }]);
    expect(s.state.outcome).toBeUndefined();
  });

  it("post-copy: POSTCOPY_ACTIVE then COMPLETED, never a restore, never start-postcopy", () => {
    const s = feed(inc(MigrationMode.POSTCOPY), [
      { type: "status", now: 1, status: "active" },
      { type: "status", now: 2, status: "postcopy-active" },
      { type: "status", now: 3, status: "completed" },
      { type: "stats-done", now: 4 },
    ]);
    expect(phases(s.effects)).toEqual(["POSTCOPY_ACTIVE", "COMPLETED"]);
    expect(types(s.effects)).not.toContain("restore-balloon");
    expect(types(s.effects)).not.toContain("start-postcopy");
  });

  it("QEMU restarted after the migration began: FAILED", () => {
    const s = feed(inc(), [{ type: "status", now: 1, status: "active" }, { type: "status", now: 2, status: "none" }, { type: "stats-done", now: 3 }]);
    expect(finalOf(s.effects)?.phase).toBe(Phase.FAILED);
  });

  it("cancel is refused on the destination", () => {
    expect(m.cancelVerdict(inc()).ok).toBe(false);
  });

  it("destination QEMU gone for lossMs: FAILED naming the destination", () => {
    const s = feed(inc(), [{ type: "hypervisor-down", now: 0, error: "x" }, { type: "tick", now: 5000 }]);
    expect(finalOf(s.effects)?.error).toMatch(/destination hypervisor/);
  });
});

describe("the machine after its end", () => {
  it("ignores every further event", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "completed" }, { type: "stats-done", now: 2 }]);
    for (const ev of [{ type: "status", now: 3, status: "failed" }, { type: "cancel", now: 3 }, { type: "tick", now: 99_999 }, { type: "failed", now: 4, error: "x" }] as Ev[]) {
      const t = m.step(s.state, ev);
      expect(t.effects).toEqual([]);
      expect(t.state).toEqual(s.state);
    }
  });

  it("a failure while collecting stats does not change the outcome", () => {
    const s = feed(noPrepare(), [...upToRunning(), { type: "status", now: 1, status: "completed" }, { type: "failed", now: 2, error: "query failed" }]);
    expect(finalOf(s.effects)).toEqual({ type: "final", phase: Phase.COMPLETED, error: "" });
  });
});

describe("post-copy paused by a broken stream", () => {
  const pc = () => feed(m.outgoing(params({ mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE }), T), [...upToRunning(), { type: "status", now: 1, status: "postcopy-active" }]);

  it("source: says so, asks for a recovery at once and again every recoverEveryMs while paused", () => {
    const s = feed(pc().state, [{ type: "status", now: 100, status: "postcopy-paused" }]);
    expect(s.effects).toEqual([{ type: "paused", paused: true }, { type: "recover" }]);
    const t = feed(s.state, [{ type: "tick", now: 1000 }, { type: "tick", now: 2100 }, { type: "tick", now: 2200 }, { type: "tick", now: 4100 }]);
    expect(types(t.effects).filter((x) => x === "recover")).toHaveLength(2);
    // Still not cancellable, and not failed.
    expect(m.cancelVerdict(t.state).ok).toBe(false);
    expect(t.state.outcome).toBeUndefined();
  });

  it("source: running again ends the pause and the retries, then completes", () => {
    const s = feed(pc().state, [
      { type: "status", now: 100, status: "postcopy-paused" },
      { type: "status", now: 200, status: "postcopy-recover" },
      { type: "status", now: 300, status: "postcopy-active" },
      { type: "tick", now: 5000 },
      { type: "status", now: 6000, status: "completed" },
      { type: "stats-done", now: 6100 },
    ]);
    expect(s.effects.filter((e) => e.type === "paused")).toEqual([{ type: "paused", paused: true }, { type: "paused", paused: false }]);
    expect(types(s.effects).filter((x) => x === "recover")).toHaveLength(1);
    expect(finalOf(s.effects)?.phase).toBe(Phase.COMPLETED);
  });

  it("destination: says so, but never asks for a recovery itself (the source drives it)", () => {
    const s = feed(m.incoming(params({ mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE }), 0, T), [
      { type: "status", now: 1, status: "postcopy-active" },
      { type: "status", now: 2, status: "postcopy-paused" },
      { type: "tick", now: 10_000 },
    ]);
    expect(s.effects).toContainEqual({ type: "paused", paused: true });
    expect(types(s.effects)).not.toContain("recover");
  });
});

describe("PREPARE declined by the agent", () => {
  it("an ack with nothing to give migrates at once, not at the deadline", () => {
    const { effects } = feed(m.outgoing(params(), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 0 },
      { type: "prepare-declined", now: 300 },
    ]);
    expect(types(effects).at(-1)).toBe("migrate");
    expect(effects).toContainEqual({ type: "timing", prepareMs: 300 });
  });
  it("after a request, a late 'declined' does not cut the inflation short", () => {
    const s = feed(m.outgoing(params(), T), [
      { type: "begin", now: 0 },
      { type: "vm-checked", now: 0, runState: "running", balloonTargetBytes: 1024, agentAttached: true },
      { type: "destination-ready", now: 0, uri: "u" },
      { type: "configured", now: 0 },
      { type: "prepare-requested", now: 100 },
      { type: "prepare-declined", now: 200 },
    ]);
    expect(types(s.effects)).not.toContain("migrate");
    expect(s.state.step).toBe("prepare");
  });
});
