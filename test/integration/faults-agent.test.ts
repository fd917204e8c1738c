/**
 * Fault matrix, guest agent: the agent is killed during PREPARE, or stopped
 * (SIGSTOP) during post-copy. Real QEMU, real guest, real coordinators.
 * Each case checks (1) the VM runs, (2) the balloon returns, (3) the record
 * says what happened and survives a coordinator restart.
 */
import { afterAll, beforeAll, describe, expect, it, onTestFailed } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { MiB } from "../../shared/units.js";
import { Lab } from "../../lab/lab.js";
import { cacheRead, startHotWriter } from "../../lab/workloads.js";
import {
  agentPids,
  beginMigration,
  guestAlive,
  guestProcState,
  killAgent,
  qemuBalloonActual,
  waitQemuBalloon,
  logTail,
  recordAfterRestart,
  settle,
  signalAgent,
  stopGuestWorkloads,
  sleep,
  waitBalloon,
} from "../../lab/faults.js";

let lab: Lab;

beforeAll(async () => {
  lab = await Lab.start({ memMiB: 1024 });
}, 300_000);

afterAll(async () => {
  await lab?.stop();
});

function dumpLogsOnFailure(): void {
  onTestFailed(() => {
    for (const h of ["a", "b"] as const) console.error(`--- coordinator ${h} (last 60) ---\n${logTail(lab, h, 60)}`);
  });
}

/** The VM's balloon ceiling on a host (config max, else RAM). */
async function maxBytes(host: "a" | "b"): Promise<number> {
  const v = await lab.vm(host);
  return Number(v.maxBytes || v.balloon?.ramBytes || 0n);
}

describe("fault matrix: guest agent", () => {
  it("agent killed during PREPARE: the migration starts by the deadline, completes, and the guest is not left inflated", async () => {
    dumpLogsOnFailure();
    await cacheRead(lab.shell, 400);
    const source = lab.active;
    const deadlineMs = 6000;
    const mig = await beginMigration(lab, {
      balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
      prepareDeadlineMs: deadlineMs,
      maxBandwidthBytesPerSec: 125_000_000n,
    });
    await mig.phase(Phase.PREPARE, 30_000);
    const prepareAt = mig.seenAt.get(Phase.PREPARE) as number;
    const killed = await killAgent(lab.shell);
    expect(killed.length).toBeGreaterThan(0);

    // (timing is a safety bound) the migration starts no later than the deadline plus a margin.
    await mig.phase(Phase.PRECOPY_PASS, deadlineMs + 20_000);
    const passAt = mig.seenAt.get(Phase.PRECOPY_PASS) as number;
    expect(passAt - prepareAt).toBeLessThan(deadlineMs + 5_000);

    const { last, err } = await mig.ended;
    expect(err).toBeUndefined();
    expect(last?.phase).toBe(Phase.COMPLETED);
    // (1) the guest runs on the destination.
    const now = await settle(lab);
    expect(now).not.toBe(source);
    expect(await guestAlive(lab.shell)).toBe(true);
    expect((await lab.vm(now)).runState).toBe("running");
    // (2) not left inflated: the destination's target returns to max within lease (10 s) + margin.
    const max = await maxBytes(now);
    await waitBalloon(lab, now, (t) => t >= max, "destination balloon target back at max", 25_000);
    const real = await waitQemuBalloon(lab.hosts[now].vm, (a) => a >= max - 16 * MiB, 30_000);
    expect(real ?? 0).toBeGreaterThanOrEqual(max - 16 * MiB);
    // (3) the record.
    const rec = await recordAfterRestart(lab, source, mig.id);
    expect(rec.phase).toBe(Phase.COMPLETED);
  }, 300_000);

  it("agent silent (SIGSTOP) during post-copy: the destination deflates by itself past the lease", async () => {
    dumpLogsOnFailure();
    // Memory to move: 400 MiB of page cache plus 300 MiB rewritten, at 100 Mbit/s post-copy lasts well over 15 s.
    // Little pressure, so the agent does not grow the balloon back on demand before it is stopped.
    await cacheRead(lab.shell, 400);
    await startHotWriter(lab.shell, { mib: 150, rateMiB: 8 });
    const pids = await agentPids(lab.shell);
    expect(pids.length).toBeGreaterThan(0);
    const source = lab.active;
    const destination = lab.other;
    const logsFrom = lab.hosts[destination].coordinator.logs.length;
    const mig = await beginMigration(lab, {
      mode: MigrationMode.POSTCOPY,
      balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
      prepareDeadlineMs: 20_000,
      maxBandwidthBytesPerSec: 12_500_000n,
    });
    let stoppedAt = 0;
    try {
      await mig.phase(Phase.POSTCOPY_ACTIVE, 120_000);
      const pcAt = Date.now();
      const shell = await lab.attachShell(destination);
      // The guest is slow while its pages stream in; give the shell time.
      await shell.ready(60_000);
      await signalAgent(shell, pids, "STOP");
      stoppedAt = Date.now();
      const inflated = await lab.vm(destination);
      const max = await maxBytes(destination);
      const targetAtStop = Number(inflated.balloon?.targetBytes ?? 0n);
      const reportedActual = Number(inflated.balloon?.actualBytes ?? 0n);
      // QEMU's own answer is the truth; the coordinator's view is logged next to it.
      const actualAtStop = (await qemuBalloonActual(lab.hosts[destination].vm)) ?? 0;
      console.log(
        `post-copy agent-stop: at STOP destination GetVm target ${targetAtStop / MiB} MiB, GetVm actual ${reportedActual / MiB} MiB, ` +
          `QEMU query-balloon actual ${actualAtStop / MiB} MiB, max ${max / MiB} MiB`,
      );
      // The shell is slow during post-copy, so the STOP can land after the host already gave the memory
      // back (the agent is silent towards the destination until it re-attaches anyway). Then the
      // destination's log must show that it was the host (LEASE/BACKSTOP), not an agent request.
      if (actualAtStop >= max - 32 * MiB) {
        const hostDeflates = lab.hosts[destination].coordinator.logs
          .slice(logsFrom)
          .filter((l) => (l.reason === "LEASE" || l.reason === "BACKSTOP") && Number(l.time ?? 0) >= pcAt - 1000);
        const agentGrows = lab.hosts[destination].coordinator.logs.slice(logsFrom).filter((l) => l.reason === "DEMAND" || l.reason === "STEADY_STATE");
        console.log(
          `post-copy agent-stop: STOP came ${((stoppedAt - pcAt) / 1000).toFixed(1)} s after POSTCOPY_ACTIVE, balloon already at max; ` +
            `host deflates on the destination: ${hostDeflates.map((l) => `${String(l.reason)} at +${((Number(l.time) - pcAt) / 1000).toFixed(1)} s (${String(l.why ?? "")})`).join(", ") || "none"}; agent requests: ${agentGrows.length}`,
        );
        expect(hostDeflates.length).toBeGreaterThan(0);
      }

      // The destination deflates by itself: target reaches max while the agent is still stopped.
      const v = await waitBalloon(lab, destination, (t) => t >= max, "destination balloon target at max with the agent stopped", 30_000);
      const real = await waitQemuBalloon(lab.hosts[destination].vm, (a) => a >= max - 16 * MiB, Math.max(1000, stoppedAt + 30_000 - Date.now()));
      const reachedAt = Date.now();
      expect(real ?? 0).toBeGreaterThanOrEqual(max - 16 * MiB);
      const srcRecord = (await lab.hosts[source].migrations.getMigration({ id: mig.id })).migration;
      console.log(
        `post-copy agent-stop: reached max ${((reachedAt - stoppedAt) / 1000).toFixed(1)} s after STOP, ` +
          `source phase then ${Phase[srcRecord?.phase ?? 0]}`,
      );
      expect(Number(v.balloon?.targetBytes)).toBeGreaterThanOrEqual(max);
      expect(await guestProcState(shell, pids[0] as number)).toBe("T");
    } finally {
      if (stoppedAt) await signalAgent(lab.shell, pids, "CONT").catch(() => {});
    }
    const { last, err } = await mig.ended;
    expect(err).toBeUndefined();
    expect(last?.phase).toBe(Phase.COMPLETED);
    const now = await settle(lab);
    expect(now).toBe(destination);
    expect(await guestAlive(lab.shell)).toBe(true);
    await stopGuestWorkloads(lab.shell);
    const rec = await recordAfterRestart(lab, source, mig.id);
    expect(rec.phase).toBe(Phase.COMPLETED);
    await sleep(0);
  }, 300_000);
});
