/**
 * QmpDriver against a scripted QMP peer on a temporary unix socket (the same
 * approach as qmp-client.test.ts: QEMU 7.2's greeting, \r\n line ends, id
 * echo), plus table tests of its two pure parsers.
 */
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { DriverEvent } from "../../coordinator/hypervisor.js";
import { QmpDriver, parseGuestStats, translateQmpEvent, type QmpDriverOptions } from "../../coordinator/qmp-driver.js";
import type { QmpEvent } from "../../coordinator/qmp-client.js";
import { UnavailableError } from "../../shared/errors.js";
import { silentLogger } from "../../shared/logger.js";
import { MiB } from "../../shared/units.js";

const GREETING = { QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "Debian 1:7.2+dfsg-7+deb12u18+b3" }, capabilities: ["oob"] } };
const RAM = 512 * MiB;

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
}

/** What a healthy QEMU 7.2 answers to the driver's inspection and commands. */
function normalAnswer(cmd: Cmd): unknown {
  switch (cmd.execute) {
    case "query-memory-size-summary":
      return { "base-memory": RAM, "plugged-memory": 0 };
    case "query-status":
      return { status: "running", singlestep: false, running: true };
    case "query-balloon":
      return { actual: RAM - 64 * MiB };
    case "qom-get":
      return { stats: { "stat-available-memory": 300 * MiB, "stat-free-memory": 100 * MiB, "stat-disk-caches": -1 }, "last-update": 1_700_000_000 };
    default:
      return {};
  }
}

/** A scripted QMP server: greets, negotiates, and answers through `answer` (which may delay). */
class FakeQmp {
  readonly server: net.Server;
  readonly conns: net.Socket[] = [];
  readonly received: Array<Cmd & { atMs: number; conn: number }> = [];
  /** When set, connections are dropped at once, before the greeting (a QEMU not ready yet); their times are kept. */
  refuse = false;
  readonly refused: number[] = [];
  /** ms to wait before answering `cmd`; 0 answers at once. */
  delayFor: (cmd: Cmd, atMs: number) => number = () => 0;

  constructor(readonly path: string) {
    this.server = net.createServer((sock) => this.accept(sock));
  }

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }

  stop(): Promise<void> {
    for (const c of this.conns) c.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  /** Connections the peer still holds open. */
  get open(): number {
    return this.conns.filter((c) => !c.destroyed).length;
  }

  get last(): net.Socket {
    const c = this.conns.at(-1);
    if (!c) throw new Error("no connection yet");
    return c;
  }

  event(name: string, data?: Record<string, unknown>): void {
    const e: Record<string, unknown> = { timestamp: { seconds: 1795614118, microseconds: 156182 }, event: name };
    if (data) e.data = data;
    reply(this.last, e);
  }

  private accept(sock: net.Socket): void {
    if (this.refuse) {
      this.refused.push(performance.now());
      sock.destroy();
      return;
    }
    this.conns.push(sock);
    const conn = this.conns.length;
    sock.on("error", () => undefined);
    reply(sock, GREETING);
    let buf = "";
    sock.setEncoding("utf8");
    sock.on("data", (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as Cmd;
        const atMs = performance.now();
        this.received.push({ ...cmd, atMs, conn });
        if (cmd.execute === "qmp_capabilities") {
          reply(sock, { return: {}, id: cmd.id });
          continue;
        }
        const send = () => {
          if (!sock.destroyed) reply(sock, { return: normalAnswer(cmd), id: cmd.id });
        };
        const d = this.delayFor(cmd, atMs);
        if (d > 0) setTimeout(send, d);
        else send();
      }
    });
  }
}

function reply(sock: net.Socket, msg: unknown): void {
  sock.write(JSON.stringify(msg) + "\r\n");
}

async function until(cond: () => boolean, what: string, timeoutMs = 3000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

let dir: string;
let peer: FakeQmp;
const drivers: QmpDriver[] = [];

/** A driver with the events it reported, timestamped. */
function driver(o: Partial<QmpDriverOptions> = {}): { d: QmpDriver; events: Array<DriverEvent & { atMs: number }> } {
  const d = new QmpDriver({
    socketPath: peer.path,
    logger: silentLogger(),
    commandTimeoutMs: 200,
    connectTimeoutMs: 500,
    statsPollingIntervalS: 2,
    backoff: { initialMs: 20, maxMs: 100 },
    ...o,
  });
  drivers.push(d);
  const events: Array<DriverEvent & { atMs: number }> = [];
  d.onEvent((e) => events.push({ ...e, atMs: performance.now() }));
  return { d, events };
}

const ups = (events: DriverEvent[]) => events.filter((e) => e.type === "up");
const downs = (events: DriverEvent[]) => events.filter((e) => e.type === "down");

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), "ballast-qmp-driver-"));
  peer = new FakeQmp(join(dir, "qmp.sock"));
  await peer.listen();
});

afterEach(async () => {
  for (const d of drivers.splice(0)) await d.close();
  await peer.stop();
  rmSync(dir, { recursive: true, force: true });
});

describe("QmpDriver: connect and inspect", () => {
  it("reports up with the VM's facts once inspected, and enables balloon stats polling", async () => {
    const { d, events } = driver();
    expect(d.connected).toBe(false);
    expect(d.facts).toBeUndefined();
    d.start();
    await until(() => ups(events).length === 1, "up");
    expect(events[0]).toMatchObject({ type: "up", facts: { ramBytes: RAM, runState: "running", balloonActualBytes: RAM - 64 * MiB } });
    expect(d.connected).toBe(true);
    expect(d.facts).toEqual({ ramBytes: RAM, runState: "running", balloonActualBytes: RAM - 64 * MiB });
    const qomSet = peer.received.find((c) => c.execute === "qom-set");
    expect(qomSet?.arguments).toEqual({ path: "/machine/peripheral/balloon0", property: "guest-stats-polling-interval", value: 2 });
    await expect(d.guestMemoryStats()).resolves.toEqual({ availableBytes: 300 * MiB, freeBytes: 100 * MiB, diskCachesBytes: undefined, lastUpdateS: 1_700_000_000 });
  });

  it.each([
    { name: "only the first answer is slow", slowUntilMs: 0 },
    { name: "the peer stays slow for 800 ms", slowUntilMs: 800 },
  ])("a slow answer after the handshake ($name): inspection retried on the same socket, up soon after the peer answers normally", async ({ slowUntilMs }) => {
    // Slower than commandTimeoutMs (200): the first answer, and every answer asked for before slowUntilMs.
    let slowAnswers = 0;
    let connectedAt = 0;
    peer.delayFor = (cmd, atMs) => {
      if (cmd.execute === "qmp_capabilities") return 0;
      if (connectedAt === 0) connectedAt = atMs;
      const slow = slowAnswers === 0 || atMs - connectedAt < slowUntilMs;
      if (!slow) return 0;
      slowAnswers++;
      return 500;
    };
    const { d, events } = driver({ commandTimeoutMs: 200 });
    d.start();
    await until(() => ups(events).length === 1, "up", 5000);
    const upAfter = events[0]!.atMs - connectedAt;
    // Not before the peer answered in time, and soon after: within the inspection backoff (BACKOFF.poll, at most 1 s) plus slack.
    expect(upAfter).toBeGreaterThanOrEqual(Math.max(200, slowUntilMs));
    expect(upAfter).toBeLessThan(Math.max(200, slowUntilMs) + 1500);
    // The same socket all along: no drop, no reconnect, no down.
    expect(peer.conns).toHaveLength(1);
    expect(peer.open).toBe(1);
    expect(downs(events)).toHaveLength(0);
    expect(peer.received.every((c) => c.conn === 1)).toBe(true);
    // The inspection was asked again on that socket.
    expect(peer.received.filter((c) => c.execute === "query-memory-size-summary").length).toBeGreaterThanOrEqual(2);
    expect(d.connected).toBe(true);
    expect(d.facts?.ramBytes).toBe(RAM);
  });

  it("commands fail fast with UnavailableError while not connected", async () => {
    const { d } = driver();
    const t0 = performance.now();
    await expect(d.setBalloon(256 * MiB)).rejects.toBeInstanceOf(UnavailableError);
    await expect(d.queryMigration()).rejects.toBeInstanceOf(UnavailableError);
    expect(performance.now() - t0).toBeLessThan(100);
  });
});

describe("QmpDriver: losing and regaining the socket", () => {
  it("reports down when the socket closes, then reconnects with backoff and reports up again", async () => {
    const { d, events } = driver();
    d.start();
    await until(() => ups(events).length === 1, "first up");
    const droppedAt = performance.now();
    peer.last.destroy();
    await until(() => downs(events).length === 1, "down");
    expect(d.connected).toBe(false);
    expect(d.facts).toBeUndefined();
    expect(events.at(-1)).toMatchObject({ type: "down", error: expect.stringMatching(/connection closed by peer/) });
    await until(() => ups(events).length === 2, "second up");
    // Backoff 20..100 ms, plus the handshake and inspection.
    expect(events.at(-1)!.atMs - droppedAt).toBeLessThan(600);
    expect(peer.conns).toHaveLength(2);
    expect(events.map((e) => e.type)).toEqual(["up", "down", "up"]);
    expect(d.connected).toBe(true);
  });

  it("keeps trying while QEMU refuses, with delays growing to backoff.maxMs and no faster", async () => {
    peer.refuse = true;
    const { d, events } = driver({ backoff: { initialMs: 20, maxMs: 100 } });
    d.start();
    await new Promise((r) => setTimeout(r, 1000));
    expect(events).toHaveLength(0);
    const t = peer.refused;
    const gaps = t.slice(1).map((x, i) => x - t[i]!);
    // About 12 attempts in a second: kept trying, but not in a hot loop.
    expect(t.length).toBeGreaterThanOrEqual(6);
    expect(t.length).toBeLessThanOrEqual(25);
    // Capped at maxMs (plus timer slack), and at the cap once the backoff has grown.
    expect(Math.max(...gaps)).toBeLessThan(100 + 40);
    expect(Math.min(...gaps.slice(-3))).toBeGreaterThanOrEqual(90);
    // QEMU is ready now: found within about one maxMs.
    peer.refuse = false;
    const readyAt = performance.now();
    await until(() => ups(events).length === 1, "up once QEMU answers", 2000);
    expect(events[0]!.atMs - readyAt).toBeLessThan(100 + 100);
    expect(downs(events)).toHaveLength(0);
  });

  it("finds a QEMU whose socket appears later", async () => {
    await peer.stop();
    const { d, events } = driver();
    d.start();
    await new Promise((r) => setTimeout(r, 300));
    expect(events).toHaveLength(0);
    peer = new FakeQmp(peer.path);
    rmSync(peer.path, { force: true });
    await peer.listen();
    const listenAt = performance.now();
    await until(() => ups(events).length === 1, "up after QEMU started", 2000);
    expect(events[0]!.atMs - listenAt).toBeLessThan(100 + 150);
  });

  it("close() stops the reconnect loop", async () => {
    const { d, events } = driver();
    d.start();
    await until(() => ups(events).length === 1, "up");
    await d.close();
    await new Promise((r) => setTimeout(r, 300));
    expect(peer.conns).toHaveLength(1);
    expect(ups(events)).toHaveLength(1);
    expect(d.connected).toBe(false);
  });

  it("passes QMP events on as driver events; STOP and RESUME update the run state", async () => {
    const { d, events } = driver();
    d.start();
    await until(() => ups(events).length === 1, "up");
    peer.event("MIGRATION", { status: "active" });
    peer.event("MIGRATION_PASS", { pass: 2 });
    peer.event("STOP");
    await until(() => events.some((e) => e.type === "stop"), "stop");
    expect(d.facts?.runState).toBe("paused");
    peer.event("RESUME");
    peer.event("BALLOON_CHANGE", { actual: 400 * MiB });
    peer.event("SHUTDOWN", { guest: true });
    await until(() => events.some((e) => e.type === "balloon-change"), "balloon-change");
    expect(d.facts?.runState).toBe("running");
    expect(events.slice(1).map(({ atMs: _atMs, ...e }) => e)).toEqual([
      { type: "migration-status", status: "active" },
      { type: "migration-pass", pass: 2 },
      { type: "stop" },
      { type: "resume" },
      { type: "balloon-change", actualBytes: 400 * MiB },
    ]);
  });
});

// ---- pure parsers ----------------------------------------------------------------

const ev = (event: string, data: Record<string, unknown> = {}): QmpEvent => ({ event, data, timestamp: { seconds: 0, microseconds: 0 } });

describe("translateQmpEvent", () => {
  it.each<[string, QmpEvent, DriverEvent | undefined]>([
    ["MIGRATION", ev("MIGRATION", { status: "postcopy-active" }), { type: "migration-status", status: "postcopy-active" }],
    ["MIGRATION without a status", ev("MIGRATION"), undefined],
    ["MIGRATION with a numeric status", ev("MIGRATION", { status: 3 }), undefined],
    ["MIGRATION_PASS", ev("MIGRATION_PASS", { pass: 4 }), { type: "migration-pass", pass: 4 }],
    ["MIGRATION_PASS with a string pass", ev("MIGRATION_PASS", { pass: "4" }), undefined],
    ["STOP", ev("STOP"), { type: "stop" }],
    ["RESUME", ev("RESUME"), { type: "resume" }],
    ["BALLOON_CHANGE", ev("BALLOON_CHANGE", { actual: 536870912 }), { type: "balloon-change", actualBytes: 536870912 }],
    ["BALLOON_CHANGE of 0", ev("BALLOON_CHANGE", { actual: 0 }), { type: "balloon-change", actualBytes: 0 }],
    ["BALLOON_CHANGE negative", ev("BALLOON_CHANGE", { actual: -1 }), undefined],
    ["BALLOON_CHANGE fractional", ev("BALLOON_CHANGE", { actual: 1.5 }), undefined],
    ["BALLOON_CHANGE as a string", ev("BALLOON_CHANGE", { actual: "536870912" }), undefined],
    ["BALLOON_CHANGE beyond 2^53", ev("BALLOON_CHANGE", { actual: 2 ** 60 }), undefined],
    ["BALLOON_CHANGE without actual", ev("BALLOON_CHANGE"), undefined],
    ["an event the driver does not use", ev("SHUTDOWN", { guest: true }), undefined],
  ])("%s", (_name, input, want) => {
    expect(translateQmpEvent(input)).toEqual(want);
  });
});

describe("parseGuestStats", () => {
  const full = { "stat-available-memory": 300 * MiB, "stat-free-memory": 100 * MiB, "stat-disk-caches": 50 * MiB };
  it.each<[string, unknown, ReturnType<typeof parseGuestStats>]>([
    ["a full answer", { stats: full, "last-update": 1_700_000_000 }, { availableBytes: 300 * MiB, freeBytes: 100 * MiB, diskCachesBytes: 50 * MiB, lastUpdateS: 1_700_000_000 }],
    ["-1 for stats the guest did not report", { stats: { ...full, "stat-available-memory": -1 }, "last-update": 5 }, { availableBytes: undefined, freeBytes: 100 * MiB, diskCachesBytes: 50 * MiB, lastUpdateS: 5 }],
    ["omitted stats", { stats: {}, "last-update": 5 }, { availableBytes: undefined, freeBytes: undefined, diskCachesBytes: undefined, lastUpdateS: 5 }],
    ["strings instead of numbers", { stats: { "stat-available-memory": "300", "stat-free-memory": "x", "stat-disk-caches": null }, "last-update": "5" }, { availableBytes: undefined, freeBytes: undefined, diskCachesBytes: undefined, lastUpdateS: 0 }],
    ["NaN, Infinity and fractions", { stats: { "stat-available-memory": Number.NaN, "stat-free-memory": Number.POSITIVE_INFINITY, "stat-disk-caches": 1.5 }, "last-update": Number.NaN }, { availableBytes: undefined, freeBytes: undefined, diskCachesBytes: undefined, lastUpdateS: 0 }],
    ["an infinite last-update", { stats: full, "last-update": Number.POSITIVE_INFINITY }, { availableBytes: 300 * MiB, freeBytes: 100 * MiB, diskCachesBytes: 50 * MiB, lastUpdateS: 0 }],
    ["no stats object and no last-update (never polled)", {}, { availableBytes: undefined, freeBytes: undefined, diskCachesBytes: undefined, lastUpdateS: 0 }],
    ["null", null, undefined],
    ["a string", "stats", undefined],
    ["a number", 42, undefined],
  ])("%s", (_name, raw, want) => {
    const got = parseGuestStats(raw);
    expect(got).toEqual(want);
    // Never NaN: every number is either a byte count or undefined.
    for (const v of Object.values(got ?? {})) if (v !== undefined) expect(Number.isNaN(v)).toBe(false);
  });
});
