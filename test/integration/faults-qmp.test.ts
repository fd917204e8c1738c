/**
 * Fault matrix, QMP trouble on the source: the coordinator talks to QEMU
 * through a unix-socket proxy the test controls (LabOptions.qmpProxy). The
 * QMP connection drops mid-migration; QEMU is killed and replaced mid-
 * migration; the first QMP answer is slow; QEMU reports a failed migration.
 * A typed error must surface within seconds (< 15 s), CancelMigration must
 * always answer, and the usual three checks hold.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BalloonStrategy, Phase } from "../../gen/ballast/v1/common_pb.js";
import { freePort } from "../../shared/net.js";
import { Lab } from "../../lab/lab.js";
import { cacheRead } from "../../lab/workloads.js";
import { beginMigration, restartQemu, sleep, waitFinal } from "../../lab/faults.js";
import { currentTarget, dumpLogsOnFailure, expectOutcome, timedCancel } from "../helpers/fault-checks.js";

let lab: Lab;

beforeAll(async () => {
  lab = await Lab.start({ memMiB: 1024, qmpProxy: true });
  await cacheRead(lab.shell, 300);
}, 300_000);

afterAll(async () => {
  await lab?.stop();
});

const FINAL = [Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED];


describe("fault matrix: QMP trouble on the source", () => {
  it("(a) the QMP connection drops mid pre-copy: the coordinator notices, cancel answers, the outcome is consistent", async () => {
    dumpLogsOnFailure(() => lab);
    const source = lab.active;
    const proxy = lab.qmpProxies[source]!;
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 8000, maxBandwidthBytesPerSec: 25_000_000n });
    await mig.phase(Phase.PRECOPY_PASS, 60_000);
    await sleep(1000);
    await proxy.block(true);
    const cutAt = Date.now();
    expect(proxy.cut()).toBeGreaterThan(0);
    // The loss is visible within seconds.
    await lab.waitVm(source, (v) => !v.qmpConnected, "GetVm shows QMP down", 15_000);
    const lossVisibleS = (Date.now() - cutAt) / 1000;
    const cancel = await timedCancel(lab, source, mig.id);
    console.log(`QMP cut: visible after ${lossVisibleS.toFixed(1)} s; cancel while down answered in ${cancel.ms} ms: ${cancel.err ?? Phase[cancel.phase ?? 0]}`);
    expect(cancel.ms).toBeLessThan(5000);
    await sleep(3000);
    await proxy.block(false);
    const out = await expectOutcome(lab, mig, { phases: FINAL, targetBeforeBytes: before, finalTimeoutMs: 120_000 });
    // An accepted cancel must end the migration as CANCELLED, not let it complete behind the caller's back.
    if (cancel.err === undefined) expect(Phase[out.record.phase]).toBe("CANCELLED");
  }, 300_000);

  it("(b) QEMU killed and restarted mid-migration: a typed error within seconds, cancel answers", async () => {
    dumpLogsOnFailure(() => lab);
    const source = lab.active;
    const before = await currentTarget(lab);
    // 1000 B/s: the migration never finishes on its own.
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: 1000n });
    await mig.phase(Phase.PRECOPY_PASS, 60_000);
    await sleep(1000);
    const killedAt = Date.now();
    // SIGKILL, then a fresh plain guest on the same sockets, as a supervisor restarting QEMU would.
    await restartQemu(lab, source);
    // Without any cancel: the coordinator must notice by itself that the migration is gone.
    const noticed = await waitFinal(lab, source, mig.id, 15_000).catch(() => undefined);
    const surfacedS = (Date.now() - killedAt) / 1000;
    console.log(`QEMU replaced: ${noticed ? `record ${Phase[noticed.phase]} ${surfacedS.toFixed(1)} s after the kill: ${noticed.error}` : "record still not final 15 s after the kill"}`);
    const cancel = await timedCancel(lab, source, mig.id);
    console.log(`QEMU replaced: cancel answered in ${cancel.ms} ms: ${cancel.err ?? Phase[cancel.phase ?? 0]}`);
    expect(cancel.ms).toBeLessThan(5000);
    const rec = await waitFinal(lab, source, mig.id, 30_000);
    expect(noticed).toBeDefined();
    expect(Phase[rec.phase]).toBe("FAILED");
    expect(rec.error).toMatch(/qemu|hypervisor|qmp|gone|restart|lost/i);
    await expectOutcome(lab, mig, { phases: [Phase.FAILED, Phase.CANCELLED], targetBeforeBytes: before, balloonTimeoutMs: 120_000 });
  }, 300_000);

  it("(c) the first QMP answer after connecting is slow (11 s): the VM is usable within seconds after the delay", async () => {
    dumpLogsOnFailure(() => lab);
    const source = lab.active;
    const proxy = lab.qmpProxies[source]!;
    const delayMs = 11_000;
    // For the next 11 s every QMP connection gets its greeting but no answer to its first command.
    proxy.slowFirstReplies(delayMs);
    const cutAt = Date.now();
    proxy.cut();
    await lab.waitVm(source, (v) => !v.qmpConnected, "GetVm shows QMP down", 15_000).catch(() => undefined);
    const v = await lab.waitVm(source, (x) => x.qmpConnected && x.balloon !== undefined, "QMP usable again", 60_000);
    const usableS = (Date.now() - cutAt) / 1000;
    console.log(`slow first QMP reply (${delayMs} ms): usable ${usableS.toFixed(1)} s after the reconnect began; proxy accepted ${proxy.stats.accepted} connections`);
    expect(v.runState).toBe("running");
    expect(usableS).toBeLessThan(delayMs / 1000 + 10);
    // And a migration works on that connection (judged by GetMigration, the record of truth).
    const before = await currentTarget(lab);
    const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: 125_000_000n });
    const out = await expectOutcome(lab, mig, { phases: [Phase.COMPLETED], targetBeforeBytes: before, skipRestart: true });
    // The Migrate stream's last snapshot must agree with the record.
    const { last } = await mig.ended;
    expect(Phase[last?.phase ?? 0]).toBe(Phase[out.record.phase]);
  }, 300_000);

  it("(d) QEMU reports the migration failed (destination not listening): FAILED within seconds with QEMU's reason", async () => {
    dumpLogsOnFailure(() => lab);
    const source = lab.active;
    const proxy = lab.qmpProxies[source]!;
    const before = await currentTarget(lab);
    const closed = await freePort();
    // The destination is prepared, but the source QEMU is told to send to a closed port.
    proxy.rewriteClientLines((line) => {
      try {
        const msg = JSON.parse(line) as { execute?: string; arguments?: { uri?: string } };
        if (msg.execute === "migrate" && msg.arguments?.uri) {
          msg.arguments.uri = `tcp:127.0.0.1:${closed}`;
          return JSON.stringify(msg);
        }
      } catch {
        // not JSON
      }
      return line;
    });
    try {
      const mig = await beginMigration(lab, { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, prepareDeadlineMs: 6000, maxBandwidthBytesPerSec: 125_000_000n });
      const out = await expectOutcome(lab, mig, { phases: [Phase.FAILED], targetBeforeBytes: before, errorMatches: /connect|refused|socket/i, finalTimeoutMs: 60_000 });
      const migrateAt = (out.record.phases.find((p) => p.phase === Phase.PRECOPY_PASS)?.atUnixMs ?? BigInt(mig.startedAt)) as bigint;
      console.log(`QEMU refused: FAILED ${out.finalAfterS.toFixed(1)} s after Migrate: ${out.record.error}`);
      expect(out.finalAfterS).toBeLessThan(6 + 15);
      expect(Number(migrateAt)).toBeGreaterThan(0);
      const cancel = await timedCancel(lab, mig.source, mig.id);
      expect(cancel.ms).toBeLessThan(5000);
      expect(cancel.code).toBe(9); // FAILED_PRECONDITION: already final
    } finally {
      proxy.rewriteClientLines(undefined);
    }
  }, 300_000);
});
