/**
 * Fault matrix, cancel in every phase: during PREPARE and during a pre-copy
 * pass the cancel succeeds (CANCELLED, balloon restored, guest on the
 * source); during POSTCOPY_ACTIVE it is refused with FAILED_PRECONDITION and
 * a reason, and the migration completes; after the end it is refused.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { Lab } from "../../lab/lab.js";
import { cacheRead, startHotWriter } from "../../lab/workloads.js";
import { beginMigration, sleep, stopGuestWorkloads } from "../../lab/faults.js";
import { currentTarget, dumpLogsOnFailure, expectOutcome, timedCancel } from "../helpers/fault-checks.js";

let lab: Lab;
let lastCompletedId = "";
let lastCompletedHost: "a" | "b" = "a";

beforeAll(async () => {
  lab = await Lab.start({ memMiB: 1024 });
  await cacheRead(lab.shell, 400);
}, 300_000);

afterAll(async () => {
  await lab?.stop();
});

const FAILED_PRECONDITION = 9;


describe("fault matrix: cancel in every phase", () => {
  it("during PREPARE: CANCELLED, balloon restored, guest on the source", async () => {
    dumpLogsOnFailure(() => lab);
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 20_000, maxBandwidthBytesPerSec: 125_000_000n });
    await mig.phase(Phase.PREPARE, 30_000);
    // Let the inflation begin, so there is something to restore.
    await sleep(700);
    const c = await timedCancel(lab, mig.source, mig.id);
    console.log(`cancel in PREPARE: ${c.ms} ms, ${c.err ?? Phase[c.phase ?? 0]}`);
    expect(c.err).toBeUndefined();
    expect(c.ms).toBeLessThan(10_000);
    const out = await expectOutcome(lab, mig, { phases: [Phase.CANCELLED], targetBeforeBytes: before, errorMatches: /cancel/i });
    expect(out.where).toBe(mig.source);
    // PRECOPY_PASS never started.
    expect(out.record.phases.map((p) => Phase[p.phase])).not.toContain("PRECOPY_PASS");
  }, 300_000);

  it("during a pre-copy pass: CANCELLED, balloon restored, guest on the source", async () => {
    dumpLogsOnFailure(() => lab);
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 15_000, maxBandwidthBytesPerSec: 20_000_000n });
    await mig.phase(Phase.PRECOPY_PASS, 60_000);
    await sleep(1000);
    const c = await timedCancel(lab, mig.source, mig.id);
    console.log(`cancel in PRECOPY_PASS: ${c.ms} ms, ${c.err ?? Phase[c.phase ?? 0]}`);
    expect(c.err).toBeUndefined();
    expect(c.ms).toBeLessThan(10_000);
    const out = await expectOutcome(lab, mig, { phases: [Phase.CANCELLED], targetBeforeBytes: before, errorMatches: /cancel/i });
    expect(out.where).toBe(mig.source);
    expect(out.qemuStatus).toMatch(/^cancelled/);
  }, 300_000);

  it("during POSTCOPY_ACTIVE: refused with FAILED_PRECONDITION and a reason; the migration completes", async () => {
    dumpLogsOnFailure(() => lab);
    await startHotWriter(lab.shell, { mib: 150, rateMiB: 16 });
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, {
      mode: MigrationMode.POSTCOPY,
      balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
      prepareDeadlineMs: 15_000,
      maxBandwidthBytesPerSec: 12_500_000n,
    });
    await mig.phase(Phase.POSTCOPY_ACTIVE, 120_000);
    const c = await timedCancel(lab, mig.source, mig.id);
    console.log(`cancel in POSTCOPY_ACTIVE: ${c.ms} ms, code ${c.code}, ${c.err ?? Phase[c.phase ?? 0]}`);
    expect(c.ms).toBeLessThan(10_000);
    expect(c.code).toBe(FAILED_PRECONDITION);
    expect(c.err).toMatch(/post-?copy/i);
    const out = await expectOutcome(lab, mig, { phases: [Phase.COMPLETED], targetBeforeBytes: before, finalTimeoutMs: 240_000 });
    expect(out.where).toBe(mig.destination);
    await stopGuestWorkloads(lab.shell);
    lastCompletedId = mig.id;
    lastCompletedHost = mig.source;
  }, 300_000);

  it("after the end: refused with FAILED_PRECONDITION", async () => {
    dumpLogsOnFailure(() => lab);
    let id = lastCompletedId;
    let host = lastCompletedHost;
    if (!id) {
      const m = await lab.migrate({ balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: 125_000_000n });
      expect(Phase[m.phase]).toBe("COMPLETED");
      id = m.id;
      host = lab.other;
    }
    const c = await timedCancel(lab, host, id);
    console.log(`cancel after the end: ${c.ms} ms, code ${c.code}, ${c.err}`);
    expect(c.ms).toBeLessThan(5000);
    expect(c.code).toBe(FAILED_PRECONDITION);
    const rec = (await lab.hosts[host].migrations.getMigration({ id })).migration;
    expect(Phase[rec?.phase ?? 0]).toBe("COMPLETED");
  }, 300_000);
});
