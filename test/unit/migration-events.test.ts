import { describe, expect, it } from "vitest";
import { AgentState, BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import {
  MAX_TIMELINE_POINTS,
  applyEvent,
  applyEventInPlace,
  foldRecord,
  recordFromCreated,
  type CreatedEvent,
  type MigrationEvent,
} from "../../coordinator/migration-events.js";
import { newRecord, recordToProto, type MigrationRecord } from "../../coordinator/migration-record.js";
import type { MigrateStats } from "../../coordinator/qemu.js";

const params = {
  vm: "vm1",
  destination: "127.0.0.1:7000",
  mode: MigrationMode.HYBRID,
  strategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
  maxBandwidthBytesPerSec: 1e8,
  downtimeLimitMs: 300,
  prepareDeadlineMs: 1000,
  postcopyAfterPasses: 2,
};
const created: CreatedEvent = { type: "created", atMs: 100, id: "m1", direction: "incoming", params };
const stats: MigrateStats = {
  status: "completed",
  totalTimeMs: 1234,
  downtimeMs: 12,
  setupTimeMs: 3,
  transferredBytes: 10,
  remainingBytes: 0,
  totalBytes: 20,
  duplicatePages: 1,
  normalPages: 2,
  normalBytes: 8192,
  dirtySyncCount: 4,
  postcopyRequests: 0,
  precopyBytes: 10,
  postcopyBytes: 0,
  postcopyBlocktimeMs: 0,
  mbps: 800.5,
  errorDesc: "",
  raw: { status: "completed" },
};
const fold = (...rest: MigrationEvent[]) => foldRecord([created, ...rest]);

describe("foldRecord", () => {
  it("starts from the created event", () => {
    const r = fold();
    expect(r).toEqual({ ...newRecord("m1", params, 100, "incoming") });
    expect(r).toMatchObject({ id: "m1", direction: "incoming", vm: "vm1", phase: Phase.UNSPECIFIED, createdMs: 100, updatedMs: 100, migrateIssued: false, cleanups: [] });
  });

  it("refuses a log that does not start with created", () => {
    expect(() => foldRecord([])).toThrow(/must start with "created"/);
    expect(() => foldRecord([{ type: "migrate-issued", atMs: 1 }])).toThrow(/"migrate-issued"/);
  });

  // One row per event type: the event and what it must change (updatedMs is always its atMs).
  const table: [string, MigrationEvent, Partial<MigrationRecord>][] = [
    ["vm", { type: "vm", atMs: 200, ramBytes: 4096, balloonTargetBeforeBytes: 2048 }, { ramBytes: 4096, balloonTargetBeforeBytes: 2048 }],
    ["phase", { type: "phase", atMs: 200, phase: Phase.PRECOPY_PASS, pass: 2 }, { phase: Phase.PRECOPY_PASS, pass: 2, phases: [{ phase: Phase.PRECOPY_PASS, pass: 2, atMs: 200 }] }],
    ["progress", { type: "progress", atMs: 200, transferredBytes: 5, remainingBytes: 6, totalBytes: 11 }, { transferredBytes: 5, remainingBytes: 6, totalBytes: 11 }],
    [
      "balloon",
      { type: "balloon", atMs: 200, targetBytes: 700, actualBytes: 800 },
      { balloonTargetBytes: 700, balloonActualBytes: 800, balloonTimeline: [{ atMs: 200, targetBytes: 700, actualBytes: 800 }] },
    ],
    ["agent", { type: "agent", atMs: 200, agentState: AgentState.READY }, { agentState: AgentState.READY }],
    ["migrate-issued", { type: "migrate-issued", atMs: 200 }, { migrateIssued: true }],
    ["timing (both)", { type: "timing", atMs: 200, prepareMs: 30, migrateMs: 40 }, { prepareMs: 30, migrateMs: 40 }],
    ["timing (one)", { type: "timing", atMs: 200, migrateMs: 40 }, { prepareMs: 0, migrateMs: 40 }],
    ["stats source", { type: "stats", atMs: 200, side: "source", stats }, { sourceStats: stats, destinationStats: undefined }],
    ["stats destination", { type: "stats", atMs: 200, side: "destination", stats }, { destinationStats: stats, sourceStats: undefined }],
    [
      "final",
      { type: "final", atMs: 200, phase: Phase.CANCELLED, error: "cancelled by request" },
      { phase: Phase.CANCELLED, error: "cancelled by request", phases: [{ phase: Phase.CANCELLED, pass: 0, atMs: 200 }] },
    ],
    [
      "cleanup",
      { type: "cleanup", atMs: 200, action: "balloon-restore", ok: true, detail: "back to 2048" },
      { cleanups: [{ atMs: 200, action: "balloon-restore", ok: true, detail: "back to 2048" }] },
    ],
  ];
  it.each(table)("%s", (_name, event, changes) => {
    const before = fold();
    const after = fold(event);
    expect(after).toEqual({ ...before, ...changes, updatedMs: 200 });
    // The incremental form gives the same record.
    expect(applyEvent(before, event)).toEqual(after);
  });

  it("a second created is ignored", () => {
    const r = fold({ ...created, atMs: 500, id: "other", direction: "outgoing" });
    expect(r).toEqual(fold());
  });

  it("the first final wins; a later final changes nothing", () => {
    const first = fold({ type: "phase", atMs: 200, phase: Phase.PRECOPY_PASS, pass: 1 }, { type: "final", atMs: 300, phase: Phase.FAILED, error: "boom" });
    const again = applyEvent(first, { type: "final", atMs: 400, phase: Phase.COMPLETED, error: "" });
    expect(again).toBe(first);
    const folded = fold(
      { type: "phase", atMs: 200, phase: Phase.PRECOPY_PASS, pass: 1 },
      { type: "final", atMs: 300, phase: Phase.FAILED, error: "boom" },
      { type: "final", atMs: 400, phase: Phase.COMPLETED, error: "" },
    );
    expect(folded).toEqual(first);
    expect(folded).toMatchObject({ phase: Phase.FAILED, error: "boom", updatedMs: 300 });
    expect(folded.phases.map((p) => p.phase)).toEqual([Phase.PRECOPY_PASS, Phase.FAILED]);
    // The final phase entry carries the pass the migration was in.
    expect(folded.phases[1]).toEqual({ phase: Phase.FAILED, pass: 1, atMs: 300 });
  });

  it("ignores phase events after the final, but keeps later stats, balloon readings and cleanups", () => {
    const r = fold(
      { type: "phase", atMs: 200, phase: Phase.SWITCHOVER, pass: 3 },
      { type: "final", atMs: 300, phase: Phase.COMPLETED, error: "" },
      { type: "phase", atMs: 310, phase: Phase.PRECOPY_PASS, pass: 4 },
      { type: "stats", atMs: 320, side: "destination", stats },
      { type: "balloon", atMs: 330, targetBytes: 1, actualBytes: 2 },
      { type: "cleanup", atMs: 340, action: "balloon-restore", ok: false, detail: "QMP gone" },
      { type: "cleanup", atMs: 350, action: "migrate-cancel", ok: true, detail: "" },
    );
    expect(r).toMatchObject({ phase: Phase.COMPLETED, pass: 3, destinationStats: stats, balloonActualBytes: 2, updatedMs: 350 });
    expect(r.phases.map((p) => p.phase)).toEqual([Phase.SWITCHOVER, Phase.COMPLETED]);
    expect(r.cleanups.map((c) => [c.action, c.ok])).toEqual([
      ["balloon-restore", false],
      ["migrate-cancel", true],
    ]);
    const late = applyEvent(r, { type: "phase", atMs: 999, phase: Phase.PREPARE, pass: 0 });
    expect(late).toBe(r);
  });

  it("a phase event naming a final phase does not end the migration", () => {
    const r = fold({ type: "phase", atMs: 200, phase: Phase.COMPLETED, pass: 1 });
    expect(r).toEqual(fold());
  });

  it("adds a timeline point only when the balloon changed, and keeps the newest points up to the cap", () => {
    const same = fold({ type: "balloon", atMs: 200, targetBytes: 1, actualBytes: 2 }, { type: "balloon", atMs: 300, targetBytes: 1, actualBytes: 2 });
    expect(same.balloonTimeline).toHaveLength(1);
    expect(same.updatedMs).toBe(300);

    const n = MAX_TIMELINE_POINTS + 500;
    const events: MigrationEvent[] = [created];
    for (let i = 0; i < n; i++) events.push({ type: "balloon", atMs: 1000 + i, targetBytes: 100, actualBytes: i });
    const r = foldRecord(events);
    expect(MAX_TIMELINE_POINTS).toBe(2000);
    expect(r.balloonTimeline).toHaveLength(MAX_TIMELINE_POINTS);
    expect(r.balloonTimeline[0]?.actualBytes).toBe(500);
    expect(r.balloonTimeline.at(-1)?.actualBytes).toBe(n - 1);

    // The incremental path caps the same way.
    let inc = recordFromCreated(created);
    for (const e of events.slice(1)) inc = applyEvent(inc, e);
    expect(inc).toEqual(r);
  });

  it("applyEvent never mutates its input", () => {
    const before = fold({ type: "balloon", atMs: 200, targetBytes: 1, actualBytes: 2 }, { type: "phase", atMs: 200, phase: Phase.PREPARE, pass: 0 });
    const snapshot = structuredClone(before);
    Object.freeze(before.phases);
    Object.freeze(before.balloonTimeline);
    Object.freeze(before.cleanups);
    Object.freeze(before);
    const after = applyEvent(before, { type: "balloon", atMs: 300, targetBytes: 5, actualBytes: 6 });
    applyEvent(after, { type: "final", atMs: 400, phase: Phase.FAILED, error: "x" });
    applyEvent(before, { type: "cleanup", atMs: 400, action: "a", ok: true, detail: "" });
    expect(before).toEqual(snapshot);
    expect(after.balloonTimeline).toHaveLength(2);
    expect(after.phases).toBe(before.phases);
  });

  it("applyEventInPlace agrees with applyEvent", () => {
    const events: MigrationEvent[] = [
      { type: "vm", atMs: 110, ramBytes: 8, balloonTargetBeforeBytes: 4 },
      { type: "phase", atMs: 120, phase: Phase.PREPARE, pass: 0 },
      { type: "balloon", atMs: 130, targetBytes: 2, actualBytes: 3 },
      { type: "final", atMs: 140, phase: Phase.COMPLETED, error: "" },
      { type: "phase", atMs: 150, phase: Phase.PREPARE, pass: 0 },
    ];
    const mut = recordFromCreated(created);
    const results = events.map((e) => applyEventInPlace(mut, e));
    expect(results).toEqual([true, true, true, true, false]);
    expect(mut).toEqual(fold(...events));
  });
});

describe("recordToProto", () => {
  it("adds failed cleanups to the error, since the wire has no cleanup list", () => {
    const r = fold(
      { type: "final", atMs: 300, phase: Phase.FAILED, error: "boom" },
      { type: "cleanup", atMs: 340, action: "balloon-restore", ok: false, detail: "QMP gone" },
      { type: "cleanup", atMs: 350, action: "migrate-cancel", ok: true, detail: "" },
    );
    expect(recordToProto(r).error).toBe("boom; balloon-restore failed: QMP gone");
    expect(recordToProto(fold({ type: "final", atMs: 300, phase: Phase.COMPLETED, error: "" })).error).toBe("");
  });
});
