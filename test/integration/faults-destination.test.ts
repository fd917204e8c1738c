/**
 * Fault matrix, destination trouble: the destination coordinator is
 * unreachable, refuses PrepareIncoming, or its QEMU dies mid pre-copy. The
 * migration must FAIL soon with an error naming the cause, the guest stays
 * on the source, its balloon is restored, and the record survives a restart.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BalloonStrategy, Phase } from "../../gen/ballast/v1/common_pb.js";
import { freePort } from "../../shared/net.js";
import { Lab } from "../../lab/lab.js";
import { cacheRead } from "../../lab/workloads.js";
import { beginMigration, killQemu, sleep } from "../../lab/faults.js";
import { currentTarget, dumpLogsOnFailure, expectOutcome } from "../helpers/fault-checks.js";

let lab: Lab;

beforeAll(async () => {
  lab = await Lab.start({ memMiB: 1024 });
  await cacheRead(lab.shell, 300);
}, 300_000);

afterAll(async () => {
  await lab?.stop();
});

const inflate = { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 8000, maxBandwidthBytesPerSec: 125_000_000n } as const;

describe("fault matrix: destination trouble", () => {
  it("(a) destination coordinator unreachable: FAILED quickly, naming the destination", async () => {
    dumpLogsOnFailure(() => lab);
    const closed = `127.0.0.1:${await freePort()}`;
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { ...inflate, destination: closed }, { incoming: false });
    const out = await expectOutcome(lab, mig, { phases: [Phase.FAILED], targetBeforeBytes: before, errorMatches: /destination|peer|127\.0\.0\.1:\d+/i, finalTimeoutMs: 60_000 });
    expect(out.finalAfterS).toBeLessThan(30);
    expect(out.where).toBe(mig.source);
  }, 300_000);

  it("(b1) destination QEMU not started with -incoming defer: FAILED with the refusal reason", async () => {
    dumpLogsOnFailure(() => lab);
    const before = await currentTarget(lab);
    // A plain (running) QEMU on the destination host instead of an incoming one.
    const wrong = await lab.startQemuOn(lab.other, false);
    await lab.waitVm(lab.other, (v) => v.qmpConnected && v.runState === "running", "plain QEMU seen on the destination", 30_000);
    const mig = await beginMigration(lab, inflate, { incoming: false });
    const out = await expectOutcome(lab, mig, { phases: [Phase.FAILED], targetBeforeBytes: before, errorMatches: /incoming|running/i, finalTimeoutMs: 60_000 });
    expect(out.finalAfterS).toBeLessThan(30);
    expect(lab.hasExited(wrong) || lab.hosts[mig.destination].vm === undefined).toBe(true);
  }, 300_000);

  it("(b2) no QEMU at all on the destination: FAILED with the reason", async () => {
    dumpLogsOnFailure(() => lab);
    const before = await currentTarget(lab);
    expect(lab.hosts[lab.other].vm).toBeUndefined();
    const mig = await beginMigration(lab, inflate, { incoming: false });
    const out = await expectOutcome(lab, mig, { phases: [Phase.FAILED], targetBeforeBytes: before, errorMatches: /qmp|qemu|destination|unavailable|connect/i, finalTimeoutMs: 60_000 });
    expect(out.finalAfterS).toBeLessThan(30);
  }, 300_000);

  it("(c) destination QEMU killed mid pre-copy: FAILED, source running, balloon restored", async () => {
    dumpLogsOnFailure(() => lab);
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { ...inflate, maxBandwidthBytesPerSec: 25_000_000n });
    await mig.phase(Phase.PRECOPY_PASS, 60_000);
    await sleep(1500);
    const dst = lab.hosts[mig.destination].vm;
    expect(dst).toBeDefined();
    const killedAt = Date.now();
    await killQemu(dst!);
    const out = await expectOutcome(lab, mig, { phases: [Phase.FAILED], targetBeforeBytes: before, finalTimeoutMs: 60_000 });
    const surfacedS = out.finalAfterS - (killedAt - mig.startedAt) / 1000;
    const raw = JSON.parse(out.record.sourceStats?.rawJson || "{}") as Record<string, unknown>;
    console.log(`destination QEMU killed: FAILED ${surfacedS.toFixed(1)} s later: ${out.record.error} (QEMU error-desc: ${JSON.stringify(raw["error-desc"])})`);
    expect(surfacedS).toBeLessThan(15);
    // The error names the cause (QEMU's own reason, e.g. a broken socket), not just "failed".
    expect(out.record.error).toMatch(/socket|connection|broken|reset|pipe|destination/i);
  }, 300_000);
});
