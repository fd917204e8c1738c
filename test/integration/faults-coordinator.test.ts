/**
 * Fault matrix, coordinator crash: the SOURCE coordinator is killed with
 * SIGKILL mid pre-copy, mid post-copy and during PREPARE, then restarted
 * with the same config and stateDir. The record must exist afterwards and
 * agree with where the guest really runs; the balloon must end where it
 * should; and the next migration of that VM must complete.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { Lab } from "../../lab/lab.js";
import { cacheRead, startHotWriter } from "../../lab/workloads.js";
import { beginMigration, crashAndRestartCoordinator, settle, sleep, stopGuestWorkloads, waitFinal, waitMigration } from "../../lab/faults.js";
import { currentTarget, dumpLogsOnFailure, expectOutcome, waitQemuQuiet } from "../helpers/fault-checks.js";

let lab: Lab;

beforeAll(async () => {
  lab = await Lab.start({ memMiB: 1024 });
}, 300_000);

afterAll(async () => {
  await lab?.stop();
});

const FINAL = [Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED];

/** After the fault: the next migration of the VM completes (by GetMigration; the lab follows the guest). */
async function nextMigrationWorks(): Promise<void> {
  const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: 125_000_000n });
  const rec = await waitFinal(lab, mig.source, mig.id, 120_000);
  await waitQemuQuiet(lab.hosts[mig.source].vm);
  const where = await settle(lab);
  expect(Phase[rec.phase]).toBe("COMPLETED");
  expect(where).toBe(mig.destination);
}

describe("fault matrix: source coordinator kill -9 and restart", () => {
  it("(a) mid pre-copy", async () => {
    dumpLogsOnFailure(() => lab);
    await cacheRead(lab.shell, 300);
    const source = lab.active;
    const before = await currentTarget(lab);
    // 25 MB/s: the first pass over ~1 GiB lasts tens of seconds.
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 8000, maxBandwidthBytesPerSec: 25_000_000n });
    await mig.phase(Phase.PRECOPY_PASS, 60_000);
    await sleep(1500);
    await crashAndRestartCoordinator(lab, source);
    // The record exists after the restart.
    const rec = await waitMigration(lab, source, mig.id, () => true, "record after restart", 20_000);
    expect(rec.id).toBe(mig.id);
    await expectOutcome(lab, mig, { phases: FINAL, targetBeforeBytes: before });
    await nextMigrationWorks();
  }, 300_000);

  it("(b) mid post-copy", async () => {
    dumpLogsOnFailure(() => lab);
    await cacheRead(lab.shell, 300);
    await startHotWriter(lab.shell, { mib: 200, rateMiB: 32 });
    const source = lab.active;
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, {
      mode: MigrationMode.POSTCOPY,
      balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
      prepareDeadlineMs: 15_000,
      maxBandwidthBytesPerSec: 12_500_000n,
    });
    await mig.phase(Phase.POSTCOPY_ACTIVE, 120_000);
    await sleep(1000);
    await crashAndRestartCoordinator(lab, source);
    const rec = await waitMigration(lab, source, mig.id, () => true, "record after restart", 20_000);
    expect(rec.id).toBe(mig.id);
    // Post-copy cannot go back: the guest runs on the destination, and the record must say COMPLETED.
    const out = await expectOutcome(lab, mig, { phases: [Phase.COMPLETED], targetBeforeBytes: before, finalTimeoutMs: 240_000 });
    expect(out.where).toBe(mig.destination);
    await stopGuestWorkloads(lab.shell);
    await nextMigrationWorks();
  }, 300_000);

  it("(c) within the first second after Migrate (PREPARE)", async () => {
    dumpLogsOnFailure(() => lab);
    await cacheRead(lab.shell, 300);
    const source = lab.active;
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 8000, maxBandwidthBytesPerSec: 125_000_000n });
    await sleep(300);
    await crashAndRestartCoordinator(lab, source);
    const rec = await waitMigration(lab, source, mig.id, () => true, "record after restart", 20_000);
    expect(rec.id).toBe(mig.id);
    await expectOutcome(lab, mig, { phases: FINAL, targetBeforeBytes: before });
    await nextMigrationWorks();
  }, 300_000);
});
