// The controller side: page-cache reclaim, effects in order, and systemd notification.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Actuator, PageCacheReclaimer } from "../../agent/act.js";
import { DeadlineError, withDeadline } from "../../agent/deadline.js";
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

describe("withDeadline", () => {
  it("settles like the work when it is in time", async () => {
    await expect(withDeadline(Promise.resolve(7), 100, "x")).resolves.toBe(7);
    await expect(withDeadline(Promise.reject(new Error("boom")), 100, "x")).rejects.toThrow("boom");
  });

  it("rejects with a DeadlineError naming the work; a late failure of the work is not an unhandled rejection", async () => {
    let fail: (err: Error) => void = () => {};
    const work = new Promise<void>((_, reject) => (fail = reject));
    const t0 = performance.now();
    const err = await withDeadline(work, 50, "the write").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DeadlineError);
    expect((err as Error).message).toBe("the write did not finish within 50 ms");
    expect(performance.now() - t0).toBeGreaterThanOrEqual(45);
    fail(new Error("late"));
    await new Promise((r) => setTimeout(r, 10));
  });

  it("a work that never settles: still rejects at the deadline", async () => {
    await expect(withDeadline(new Promise(() => {}), 20, "forever")).rejects.toBeInstanceOf(DeadlineError);
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
