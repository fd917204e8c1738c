// The controller side: page-cache reclaim, effects in order, and systemd notification.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Actuator, FreeMemoryZeroer, PageCacheReclaimer, childProcessArena, type ZeroArena, type ZeroArenaFactory } from "../../agent/act.js";
import type { ZeroStep } from "../../agent/policy.js";
import type { Sample } from "../../agent/sample.js";
import type { SessionRequestInit } from "../../agent/wire.js";
import { SystemdNotifier } from "../../agent/systemd.js";
import { BalloonReason, Phase } from "../../gen/ballast/v1/common_pb.js";

const MiB = 1024 * 1024;
const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

function roots(opts: { reclaim?: boolean; drop?: boolean }) {
  const d = mkdtempSync(join(tmpdir(), "ballast-agent-act-"));
  dirs.push(d);
  const proc = join(d, "proc");
  const sys = join(d, "sys");
  mkdirSync(join(proc, "sys/vm"), { recursive: true });
  mkdirSync(join(sys, "fs/cgroup"), { recursive: true });
  if (opts.drop) writeFileSync(join(proc, "sys/vm/drop_caches"), "");
  if (opts.reclaim) writeFileSync(join(sys, "fs/cgroup/memory.reclaim"), "");
  return { proc, sys };
}

describe("PageCacheReclaimer", () => {
  it("prefers cgroup v2 memory.reclaim at the root, writing the byte count", async () => {
    const { proc, sys } = roots({ reclaim: true, drop: true });
    const r = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys, sync: async () => undefined });
    expect(r.method()).toBe("memory.reclaim");
    const res = await r.reclaim(382 * MiB, 1000);
    expect(res).toMatchObject({ method: "memory.reclaim", complete: true, requestedBytes: 382 * MiB });
    expect(readFileSync(join(sys, "fs/cgroup/memory.reclaim"), "utf8")).toBe(String(382 * MiB));
    expect(readFileSync(join(proc, "sys/vm/drop_caches"), "utf8")).toBe("");
  });

  it("falls back to sync + drop_caches=1", async () => {
    const { proc, sys } = roots({ drop: true });
    const calls: number[] = [];
    const r = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys, sync: async (t) => void calls.push(t) });
    expect(r.method()).toBe("drop_caches");
    const res = await r.reclaim(100 * MiB, 2000);
    expect(res.complete).toBe(true);
    expect(calls).toEqual([1000]); // sync may use at most half the budget
    expect(readFileSync(join(proc, "sys/vm/drop_caches"), "utf8")).toBe("1");
  });

  it("a failing sync does not stop the drop", async () => {
    const { proc, sys } = roots({ drop: true });
    const r = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys, sync: async () => Promise.reject(new Error("sync timed out")) });
    expect((await r.reclaim(1, 1000)).complete).toBe(true);
    expect(readFileSync(join(proc, "sys/vm/drop_caches"), "utf8")).toBe("1");
  });

  it("gives up at the budget without throwing", async () => {
    const { proc, sys } = roots({ drop: true });
    const r = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys, sync: () => new Promise((res) => setTimeout(res, 400)) });
    const res = await r.reclaim(1, 100);
    expect(res.complete).toBe(false);
    expect(res.error).toContain("budget");
  });

  it("nothing writable: reports, never throws", async () => {
    const { proc, sys } = roots({});
    const r = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys });
    expect(r.method()).toBe("none");
    expect(await r.reclaim(1, 100)).toMatchObject({ method: "none", complete: false });
  });
});

describe("Actuator", () => {
  it("runs effects in order: reclaim before the balloon request, the ack after; bytes become uint64", async () => {
    const { proc, sys } = roots({ drop: true });
    const sent: SessionRequestInit[] = [];
    const order: string[] = [];
    const reclaimer = new PageCacheReclaimer({ procRoot: proc, sysRoot: sys, sync: async () => void order.push("reclaim") });
    const act = new Actuator({ send: async (r) => void (sent.push(r), order.push(r.msg?.case ?? "?")), reclaimer });
    await act.run([
      { kind: "log", level: "info", msg: "hi" },
      { kind: "reclaim", bytes: 10 * MiB, budgetMs: 1000 },
      { kind: "balloon", targetBytes: 465 * MiB, reason: "prepare", detail: "d", migrationId: "m1" },
      { kind: "ack", migrationId: "m1", phase: Phase.PREPARE, targetBytes: 465 * MiB },
    ]);
    expect(order).toEqual(["reclaim", "balloonRequest", "phaseAck"]);
    expect(sent[0]).toEqual({ msg: { case: "balloonRequest", value: { targetBytes: BigInt(465 * MiB), reason: BalloonReason.PREPARE, detail: "d", migrationId: "m1" } } });
    expect(sent[1]).toEqual({ msg: { case: "phaseAck", value: { migrationId: "m1", phase: Phase.PREPARE, targetBytes: BigInt(465 * MiB) } } });
  });

  it("a failed send propagates (the stream is gone)", async () => {
    const act = new Actuator({ send: async () => Promise.reject(new Error("stream closed")), reclaimer: null });
    await expect(act.run([{ kind: "ack", migrationId: "m", phase: Phase.COMPLETED, targetBytes: 0 }])).rejects.toThrow("stream closed");
  });
});

/** An arena that records what it was asked; `growMs` simulates the time a unit takes. */
function fakeArena(opts: { startMs?: number; growMs?: number; failStart?: boolean; failGrowAt?: number } = {}) {
  const log: string[] = [];
  let held = 0;
  const factory: ZeroArenaFactory = (signal) =>
    new Promise<ZeroArena>((resolve, reject) => {
      log.push("start");
      signal.addEventListener("abort", () => log.push("start abandoned"));
      setTimeout(() => {
        if (opts.failStart) {
          reject(new Error("spawn ENOENT"));
          return;
        }
        resolve({
          grow: async (bytes) => {
            if (opts.failGrowAt !== undefined && log.filter((l) => l.startsWith("grow")).length === opts.failGrowAt) throw new Error("helper died");
            log.push(`grow ${bytes / MiB}`);
            await new Promise((r) => setTimeout(r, opts.growMs ?? 0));
            held += bytes;
          },
          release: async () => {
            log.push(`release ${held / MiB}`);
            held = 0;
          },
        });
      }, opts.startMs ?? 0);
    });
  return { factory, log };
}

const chunks = (sizes: number[]) => {
  let i = 0;
  return (): ZeroStep => {
    const b = sizes[i++];
    return b === undefined ? { bytes: 0, stop: "done", detail: "plan done" } : { bytes: b * MiB, detail: `unit ${i}` };
  };
};

describe("FreeMemoryZeroer", () => {
  it("asks before every unit, holds them all, then releases once", async () => {
    const { factory, log } = fakeArena();
    const asked: number[] = [];
    const next = chunks([64, 64, 4]);
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(132 * MiB, 2000, (z) => (asked.push(z / MiB), next()));
    expect(log).toEqual(["start", "grow 64", "grow 64", "grow 4", "release 132"]);
    expect(asked).toEqual([0, 64, 128, 132]);
    expect(r).toMatchObject({ plannedBytes: 132 * MiB, zeroedBytes: 132 * MiB, chunks: 3, stoppedBy: "done" });
  });

  it.each([
    ["room", { bytes: 0, stop: "room", detail: "room 3 MiB" }],
    ["pressure", { bytes: 0, stop: "pressure", detail: "psi" }],
  ] as const)("stops when the check says %s, and still releases", async (stop, step) => {
    const { factory, log } = fakeArena();
    let n = 0;
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(200 * MiB, 2000, () => (n++ === 0 ? { bytes: 64 * MiB, detail: "" } : step));
    expect(r.stoppedBy).toBe(stop);
    expect(log).toEqual(["start", "grow 64", "release 64"]);
  });

  it("stops at the time budget, mid-unit included, and releases", async () => {
    const { factory, log } = fakeArena({ growMs: 60 });
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(512 * MiB, 100, () => ({ bytes: 64 * MiB, detail: "" }));
    expect(r.stoppedBy).toBe("budget");
    expect(r.elapsedMs).toBeLessThan(400);
    expect(log.at(-1)).toMatch(/^release/);
  });

  it("a helper slower to start than the budget is abandoned", async () => {
    const { factory, log } = fakeArena({ startMs: 200 });
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(64 * MiB, 50, () => ({ bytes: 64 * MiB, detail: "" }));
    expect(r).toMatchObject({ stoppedBy: "budget", zeroedBytes: 0 });
    expect(log).toContain("start abandoned");
    await new Promise((res) => setTimeout(res, 250));
    // It came up after all: released at once, never grown.
    expect(log).toEqual(["start", "start abandoned", "release 0"]);
  });

  it("abort (the migration moved on): stops and releases", async () => {
    const { factory, log } = fakeArena({ growMs: 50 });
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 80);
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(512 * MiB, 5000, () => ({ bytes: 8 * MiB, detail: "" }), ac.signal);
    expect(r.stoppedBy).toBe("aborted");
    expect(log.at(-1)).toMatch(/^release/);
  });

  it.each([
    ["the helper cannot start", { failStart: true }, ["start", "start abandoned"]],
    ["the helper dies", { failGrowAt: 1 }, ["start", "grow 8", "release 8"]],
  ])("never throws: %s", async (_, opts, want) => {
    const { factory, log } = fakeArena(opts);
    const r = await new FreeMemoryZeroer({ arena: factory }).zero(64 * MiB, 2000, () => ({ bytes: 8 * MiB, detail: "" }));
    expect(r.stoppedBy).toBe("error");
    expect(log).toEqual(want);
  });

  it("the real helper process: small units, written, released by its exit", async () => {
    const r = await new FreeMemoryZeroer({ arena: childProcessArena() }).zero(4 * MiB, 10_000, chunks([2, 2]));
    expect(r).toMatchObject({ zeroedBytes: 4 * MiB, chunks: 2, stoppedBy: "done" });
    expect(r.error).toBeUndefined();
  });

  it("the real helper process: a missing binary is an error, not a throw", async () => {
    const r = await new FreeMemoryZeroer({ arena: childProcessArena({ execPath: "/nonexistent/node" }) }).zero(4 * MiB, 2000, chunks([2]));
    expect(r.stoppedBy).toBe("error");
  });
});

describe("Actuator: zeroing", () => {
  const MB = (n: number) => n * MiB;
  function reading(freeMiB: number): Sample {
    return {
      timestampMs: 0,
      monotonicMs: 0,
      meminfo: { memTotal: MB(959), memFree: MB(freeMiB), memAvailable: MB(freeMiB + 70), buffers: 0, cached: 0, activeFile: 0, inactiveFile: 0, anonPages: 0, mapped: 0, shmem: 0, dirty: 0, writeback: 0, swapTotal: 0, swapFree: 0 },
      vmstat: { pgmajfault: 0, workingsetRefaultFile: 0, workingsetRefaultAnon: 0, pswpin: 0, pswpout: 0, oomKill: 0 },
      watermarks: { minFreeBytes: MB(44), highBytes: MB(66), source: "zoneinfo" },
      balloon: { source: "unknown" },
    };
  }

  it("zeroes between the balloon request and the ack, re-reading memory before each unit", async () => {
    const { factory, log } = fakeArena();
    const order: string[] = [];
    // Free memory falls as the helper holds more: 230 -> 166 -> 102 (room 132, 68, 4).
    let free = 230;
    const zeroer = new FreeMemoryZeroer({ arena: factory });
    const act = new Actuator({
      send: async (r) => void order.push(r.msg?.case ?? "?"),
      reclaimer: null,
      zeroer,
      sample: () => {
        order.push(`sample ${free}`);
        const s = reading(free);
        free -= 64;
        return s;
      },
    });
    expect(act.canZero).toBe(true);
    await act.run([
      { kind: "balloon", targetBytes: MB(465), reason: "prepare", detail: "d", migrationId: "m1" },
      { kind: "zero", bytes: MB(132), chunkBytes: MB(64), budgetMs: 2000, migrationId: "m1" },
      { kind: "ack", migrationId: "m1", phase: Phase.PREPARE, targetBytes: MB(465) },
    ]);
    expect(order).toEqual(["balloonRequest", "sample 230", "sample 166", "sample 102", "phaseAck"]);
    expect(log).toEqual(["start", "grow 64", "grow 64", "release 128"]);
  });

  it("without a zeroer or a way to sample, a zero effect does nothing", async () => {
    const sent: string[] = [];
    for (const act of [
      new Actuator({ send: async (r) => void sent.push(r.msg?.case ?? "?"), reclaimer: null }),
      new Actuator({ send: async (r) => void sent.push(r.msg?.case ?? "?"), reclaimer: null, zeroer: new FreeMemoryZeroer({ arena: fakeArena().factory }) }),
    ]) {
      expect(act.canZero).toBe(false);
      await act.run([{ kind: "zero", bytes: MB(100), chunkBytes: MB(64), budgetMs: 2000, migrationId: "m" }, { kind: "ack", migrationId: "m", phase: Phase.PREPARE, targetBytes: 0 }]);
    }
    expect(sent).toEqual(["phaseAck", "phaseAck"]);
  });

  it("an incomplete reading stops the zeroing", async () => {
    const { factory, log } = fakeArena();
    const act = new Actuator({ send: async () => undefined, reclaimer: null, zeroer: new FreeMemoryZeroer({ arena: factory }), sample: () => undefined });
    await act.run([{ kind: "zero", bytes: MB(100), chunkBytes: MB(64), budgetMs: 2000, migrationId: "m" }]);
    expect(log).toEqual(["start", "release 0"]);
  });
});

describe("SystemdNotifier", () => {
  it("no NOTIFY_SOCKET: everything is a no-op", async () => {
    const calls: string[][] = [];
    const n = new SystemdNotifier({ env: {}, exec: async (a) => void calls.push(a) });
    await n.ready();
    expect(n.enabled).toBe(false);
    expect(n.watchdogIntervalMs()).toBeUndefined();
    n.startWatchdog()();
    expect(calls).toEqual([]);
  });

  it("ready and status through systemd-notify", async () => {
    const calls: string[][] = [];
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: "/run/systemd/notify" }, exec: async (a) => void calls.push(a) });
    await n.ready("attaching");
    await n.stopping();
    expect(calls).toEqual([["--ready", "--status=attaching"], ["STOPPING=1"]]);
  });

  it.each([
    [{ WATCHDOG_USEC: "10000000" }, 5000],
    [{ WATCHDOG_USEC: "10000000", WATCHDOG_PID: "42" }, 5000],
    [{ WATCHDOG_USEC: "10000000", WATCHDOG_PID: "43" }, undefined],
    [{ WATCHDOG_USEC: "junk" }, undefined],
    [{}, undefined],
  ])("watchdog interval for %j", (env, want) => {
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: "/run/x", ...env }, pid: 42, exec: async () => undefined });
    expect(n.watchdogIntervalMs()).toBe(want);
  });

  it("pings WATCHDOG=1 every WATCHDOG_USEC/2 while healthy", async () => {
    const calls: string[][] = [];
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: "/run/x", WATCHDOG_USEC: "100000" }, exec: async (a) => void calls.push(a) });
    let healthy = true;
    const stop = n.startWatchdog(() => healthy);
    await new Promise((r) => setTimeout(r, 180));
    const pings = calls.length;
    expect(pings).toBeGreaterThanOrEqual(2);
    expect(calls.every((c) => c[0] === "WATCHDOG=1")).toBe(true);
    healthy = false;
    await new Promise((r) => setTimeout(r, 120));
    expect(calls.length).toBe(pings);
    stop();
  });

  it("a failing systemd-notify is logged, not thrown", async () => {
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: "/run/x" }, exec: async () => Promise.reject(new Error("ENOENT")) });
    await expect(n.ready()).resolves.toBeUndefined();
  });
});

describe("wire boundary", () => {
  it("samples and estimates become uint64; PSI and estimates are filled in", async () => {
    const { Collector } = await import("../../agent/sample.js");
    const { estimateMemory } = await import("../../agent/policy.js");
    const { toMemorySample } = await import("../../agent/wire.js");
    const s = new Collector({ procRoot: "test/fixtures/proc/host-debian12", sysRoot: "test/fixtures/proc/host-debian12-sys" }).collect();
    const e = estimateMemory(s, {});
    const m = toMemorySample(s, e);
    expect(m.memTotalBytes).toBe(BigInt(s.meminfo.memTotal));
    expect(m.workingSetBytes).toBe(BigInt(e.workingSetBytes));
    expect(m.unreclaimableBytes).toBe(BigInt(e.baseBytes));
    expect(m.psiSomeTotalUs).toBe(BigInt(s.psi!.some.totalUs));
    expect(m.balloonBytes).toBe(0n);
  });

  it("coordinator messages become numbers; 0 deadline means none", async () => {
    const { create } = await import("@bufbuild/protobuf");
    const { PhaseEventSchema, PolicySchema } = await import("../../gen/ballast/v1/agent_pb.js");
    const { BalloonStateSchema } = await import("../../gen/ballast/v1/common_pb.js");
    const { balloonFrom, phaseSignalFrom, policyFrom } = await import("../../agent/wire.js");
    expect(phaseSignalFrom(create(PhaseEventSchema, { migrationId: "m", phase: Phase.PREPARE, deadlineUnixMs: 5n }))).toEqual({ migrationId: "m", phase: Phase.PREPARE, pass: 0, deadlineUnixMs: 5 });
    expect(phaseSignalFrom(create(PhaseEventSchema, { migrationId: "m", phase: Phase.FAILED, error: "boom" }))).toEqual({ migrationId: "m", phase: Phase.FAILED, pass: 0, error: "boom" });
    expect(policyFrom(create(PolicySchema, { floorBytes: 1n, maxBytes: 2n, sampleIntervalMs: 3, steadyState: true }))).toEqual({ floorBytes: 1, maxBytes: 2, sampleIntervalMs: 3, steadyState: true });
    expect(balloonFrom(create(BalloonStateSchema, { targetBytes: 1n, actualBytes: 2n, ramBytes: 3n }))).toEqual({ targetBytes: 1, actualBytes: 2, ramBytes: 3 });
  });
});
