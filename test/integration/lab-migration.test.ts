/**
 * End-to-end on real guests: a Debian kernel with the Ballast agent inside,
 * two hosts (QEMU + coordinator each) on 127.0.0.1, real migrations.
 * Asserts on bytes, counters, phases and guest state, never on wall time.
 */
import { afterEach, describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import type { Migration } from "../../gen/ballast/v1/migration_pb.js";
import { MiB } from "../../shared/units.js";
import { Lab, type LabOptions } from "../../lab/lab.js";
import { cacheRead, freedAnon, guestMeminfo, guestVmstat, startBurst, startHotWriter } from "../../lab/workloads.js";

/** 1 Gbit/s, so runs compare. */
const BANDWIDTH = 125_000_000n;

let lab: Lab | undefined;

async function startLab(o: LabOptions = {}): Promise<Lab> {
  lab = await Lab.start({ memMiB: 1024, ...o });
  return lab;
}

afterEach(async () => {
  await lab?.stop();
  lab = undefined;
});

const sent = (m: Migration) => Number(m.sourceStats?.transferredBytes ?? 0n);

describe("real guests in the two-host lab", () => {
  it("the agent attaches and its samples match the guest's /proc/meminfo", async () => {
    const l = await startLab();
    const vm = await l.waitVm(l.active, (v) => v.lastSample !== undefined, "a memory sample", 30_000);
    const mem = await guestMeminfo(l.shell);
    const s = vm.lastSample!;
    // MemTotal does not move; free memory moves a little between the two reads.
    expect(Number(s.memTotalBytes)).toBe(mem.MemTotal);
    expect(Math.abs(Number(s.memAvailableBytes) - (mem.MemAvailable ?? 0))).toBeLessThan(64 * MiB);
    expect(Number(s.memTotalBytes)).toBeGreaterThan(900 * MiB);
    expect(vm.agentConnected).toBe(true);
  });

  it("pre-copy with Ballast sends at most half the bytes of a plain migration of the same guest state", async () => {
    const l = await startLab();
    // ≥ 500 MiB reclaimable: 300 MiB freed anon + 500 MiB clean page cache.
    await freedAnon(l.shell, 300);
    await cacheRead(l.shell, 500);
    const before = await guestMeminfo(l.shell);
    expect(before.Cached).toBeGreaterThan(450 * MiB);

    const plain = await l.migrate({ balloonStrategy: BalloonStrategy.NONE, maxBandwidthBytesPerSec: BANDWIDTH });
    expect(plain.phase).toBe(Phase.COMPLETED);
    const cachedAfterPlain = (await guestMeminfo(l.shell)).Cached ?? 0;
    expect(cachedAfterPlain).toBeGreaterThan(450 * MiB);

    const ballast = await l.migrate({ balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, maxBandwidthBytesPerSec: BANDWIDTH, prepareDeadlineMs: 30_000 });
    expect(ballast.phase).toBe(Phase.COMPLETED);
    expect(ballast.phases.map((p) => p.phase)).toContain(Phase.PREPARE);
    expect(sent(ballast)).toBeGreaterThan(0);
    expect(sent(ballast)).toBeLessThanOrEqual(0.5 * sent(plain));

    // Alive on the destination, agent re-attached there (Lab.migrate waited for it), balloon back to steady state.
    const echo = await l.shell.run("echo alive");
    expect(echo.output.trim()).toBe("alive");
    const ram = 1024 * MiB;
    const back = await l.waitVm(l.active, (v) => Number(v.balloon?.actualBytes ?? 0n) >= ram - 16 * MiB, "balloon deflated back", 60_000);
    expect(back.agentConnected).toBe(true);
    const vmstat = await guestVmstat(l.shell);
    expect(vmstat.oom_kill ?? 0).toBe(0);
  });

  it("post-copy with Ballast: the agent deflates on demand after switchover, no OOM kill", async () => {
    const l = await startLab();
    await cacheRead(l.shell, 400);
    await startHotWriter(l.shell, { mib: 150, rateMiB: 32 });
    await startBurst(l.shell, { mib: 300, triggerFile: "/tmp/burst.go", outFile: "/tmp/burst.out" });
    const oomBefore = (await guestVmstat(l.shell)).oom_kill ?? 0;

    const m = await l.migrate(
      { mode: MigrationMode.POSTCOPY, balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, maxBandwidthBytesPerSec: BANDWIDTH, prepareDeadlineMs: 30_000 },
      { onPostcopy: async (shell) => void (await shell.run("touch /tmp/burst.go", { timeoutMs: 60_000 })) },
    );
    expect(m.phase).toBe(Phase.COMPLETED);
    expect(m.phases.map((p) => p.phase)).toContain(Phase.POSTCOPY_ACTIVE);
    const raw = JSON.parse(m.sourceStats?.rawJson ?? "{}") as { ram?: Record<string, unknown> };
    expect(typeof raw.ram?.["postcopy-requests"]).toBe("number");

    // The burst needs memory the balloon held: the agent must have deflated.
    const until = Date.now() + 90_000;
    let out = "";
    while (Date.now() < until) {
      out = (await l.shell.run("cat /tmp/burst.out 2>/dev/null")).output;
      if (out.includes("burst-done")) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    expect(out).toContain("burst-done");
    expect((await guestVmstat(l.shell)).oom_kill ?? 0).toBe(oomBefore);
    const vm = await l.vm();
    expect(Number(vm.balloon?.actualBytes ?? 0n)).toBeGreaterThan(Number(m.balloonTimeline.reduce((a, p) => Math.min(a, Number(p.actualBytes)), Infinity)));
  });

  it("cancel during pre-copy restores the balloon and the guest keeps running on the source", async () => {
    const l = await startLab();
    await cacheRead(l.shell, 400);
    const source = l.active;
    const before = await l.vm(source);
    const targetBefore = Number(before.balloon?.targetBytes ?? 0n);
    let cancelled = false;
    const m = await l.migrate(
      // 20 MB/s: the first pass takes long enough to cancel it mid-way.
      { balloonStrategy: BalloonStrategy.INFLATE_THEN_MIGRATE, maxBandwidthBytesPerSec: 20_000_000n, prepareDeadlineMs: 30_000 },
      {
        onUpdate: (u) => {
          if (!cancelled && u.phase === Phase.PRECOPY_PASS) {
            cancelled = true;
            void l.hosts[source].migrations.cancelMigration({ id: u.id });
          }
        },
      },
    );
    expect(m.phase).toBe(Phase.CANCELLED);
    expect(Number(m.balloonTargetBeforeBytes)).toBe(targetBefore);
    // During PREPARE the balloon went down; now it is back where it was.
    expect(m.balloonTimeline.some((p) => Number(p.targetBytes) < targetBefore)).toBe(true);
    const after = await l.waitVm(source, (v) => Number(v.balloon?.actualBytes ?? 0n) >= targetBefore - 16 * MiB, "balloon restored", 60_000);
    expect(Number(after.balloon?.targetBytes ?? 0n)).toBe(targetBefore);
    expect(after.runState).toBe("running");
    expect(l.active).toBe(source);
    expect((await l.shell.run("echo still-here")).output.trim()).toBe("still-here");
  });
});
