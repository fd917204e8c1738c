// The session client against an in-process fake coordinator on 127.0.0.1, fed from a real guest capture.
import * as grpc from "@grpc/grpc-js";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { FreeMemoryZeroer, PageCacheReclaimer, type ZeroArenaFactory } from "../../agent/act.js";
import { DEFAULT_RUNTIME_OPTIONS } from "../../agent/runtime.js";
import { Collector } from "../../agent/sample.js";
import { AgentSession, backoffDelayMs, AGENT_CHANNEL_OPTIONS } from "../../agent/session.js";
import { AgentService, type PhaseEventSchema, type SessionRequest, type SessionResponseSchema } from "../../gen/ballast/v1/agent_pb.js";
import { BalloonReason, Phase } from "../../gen/ballast/v1/common_pb.js";
import { addService, type BidiContext } from "../../shared/grpc-adapter.js";
import type { MessageInitShape } from "@bufbuild/protobuf";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
type ResponseInit = MessageInitShape<typeof SessionResponseSchema>;

interface FakeSession {
  ctx: BidiContext<SessionRequest, ResponseInit>;
  requests: SessionRequest[];
}

/** A coordinator that welcomes every agent, records what it sends, and lets the test push messages. */
class FakeCoordinator {
  readonly sessions: FakeSession[] = [];
  private server: grpc.Server | undefined;
  port = 0;
  constructor(
    readonly hostId: string,
    private readonly currentPhase?: MessageInitShape<typeof PhaseEventSchema>,
  ) {}

  async start(port = 0): Promise<number> {
    const server = new grpc.Server();
    addService(
      server,
      AgentService,
      {
        session: async (ctx) => {
          const s: FakeSession = { ctx, requests: [] };
          this.sessions.push(s);
          for await (const req of ctx) {
            s.requests.push(req);
            if (req.msg.case === "hello") {
              await ctx.send({ msg: { case: "welcome", value: { vmName: "vm1", hostId: this.hostId, currentPhase: this.currentPhase } } });
              await ctx.send({ msg: { case: "policy", value: { floorBytes: BigInt(256 * MiB), maxBytes: BigInt(GiB), sampleIntervalMs: 100, steadyState: false } } });
              await ctx.send({ msg: { case: "balloonState", value: { targetBytes: BigInt(GiB), actualBytes: BigInt(GiB), ramBytes: BigInt(GiB) } } });
            }
          }
        },
      },
      (err) => ({ code: grpc.status.INTERNAL, details: String(err) }),
    );
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
    );
    this.server = server;
    return this.port;
  }

  kill(): void {
    this.server?.forceShutdown();
    this.server = undefined;
  }

  get last(): FakeSession {
    const s = this.sessions[this.sessions.length - 1];
    if (!s) throw new Error("no session yet");
    return s;
  }

  all(): SessionRequest[] {
    return this.sessions.flatMap((s) => s.requests);
  }

  send(msg: ResponseInit): Promise<void> {
    return this.last.ctx.send(msg);
  }
}

async function waitFor<T>(what: string, fn: () => T | undefined | false, timeoutMs = 8000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const balloonRequests = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "balloonRequest" ? [r.msg.value] : []));
const acks = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "phaseAck" ? [r.msg.value] : []));
const samples = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "sample" ? [r.msg.value] : []));

let root = "";
let sys = "";
const servers: FakeCoordinator[] = [];
let agent: AgentSession | undefined;

beforeAll(() => {
  // The real 1 GiB Debian 6.1 guest with ~500 MiB of clean cache, plus the files a full /proc has.
  root = mkdtempSync(join(tmpdir(), "ballast-agent-session-"));
  cpSync("test/fixtures/proc/debian-6.1-guest-cache", root, { recursive: true });
  // The capture has zoneinfo and min_free_kbytes; add a writable drop_caches and a boot id.
  mkdirSync(join(root, "sys/vm"), { recursive: true });
  mkdirSync(join(root, "sys/kernel/random"), { recursive: true });
  writeFileSync(join(root, "sys/vm/drop_caches"), "");
  writeFileSync(join(root, "sys/kernel/random/boot_id"), "0f6d3c2e-1111-4222-8333-444455556666\n");
  sys = join(root, "sysfs");
  cpSync("test/fixtures/proc/debian-6.1-guest-cache-sys", sys, { recursive: true });
});

afterEach(async () => {
  await agent?.stop();
  agent = undefined;
  for (const s of servers.splice(0)) s.kill();
});

afterAll(() => rmSync(root, { recursive: true, force: true }));

function startAgent(port: number, zeroer?: FreeMemoryZeroer, reportEveryMs = 0): AgentSession {
  const a = new AgentSession({
    coordinator: `127.0.0.1:${port}`,
    vmId: "vm1-agent",
    collector: new Collector({ procRoot: root, sysRoot: sys }),
    reclaimer: new PageCacheReclaimer({ procRoot: root, sysRoot: sys, sync: async () => undefined }),
    zeroer: zeroer ?? null,
    runtime: { ...DEFAULT_RUNTIME_OPTIONS, sampleIntervalMs: 100, fastSampleIntervalMs: 50, reportEveryMs, zeroFree: zeroer !== undefined },
    backoff: { initialMs: 50, maxMs: 400, factor: 2 },
  });
  a.start();
  agent = a;
  return a;
}

describe("AgentSession against a fake coordinator", () => {
  it("hello first, samples, PREPARE, post-copy demand, re-attach after a coordinator restart", async () => {
    const first = new FakeCoordinator("host-a");
    servers.push(first);
    const port = await first.start();
    const a = startAgent(port);

    // Hello is the first message, with identity and capabilities.
    await waitFor("hello", () => first.sessions[0]?.requests[0]);
    const hello = first.sessions[0]!.requests[0]!;
    expect(hello.msg.case).toBe("hello");
    if (hello.msg.case !== "hello") throw new Error("unreachable");
    expect(hello.msg.value).toMatchObject({ vmId: "vm1-agent", agentVersion: "0.1.0", bootId: "0f6d3c2e-1111-4222-8333-444455556666" });
    expect(hello.msg.value.capabilities).toEqual(expect.arrayContaining(["psi", "drop-caches", "postcopy-demand"]));

    // Samples arrive every Policy interval, with the agent's estimates filled in.
    await waitFor("3 samples", () => samples(first.all()).length >= 3);
    const sample = samples(first.all())[0]!;
    expect(sample.memTotalBytes).toBe(981700n * 1024n);
    expect(sample.workingSetBytes).toBeGreaterThan(0n);
    expect(sample.unreclaimableBytes).toBeGreaterThan(0n);
    expect(a.currentHostId).toBe("host-a");

    // PREPARE: drop caches, BalloonRequest(PREPARE, migration id), then PhaseAck with the same target.
    await first.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-1", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    const ack = await waitFor("PREPARE ack", () => acks(first.all()).find((x) => x.phase === Phase.PREPARE));
    const prepare = balloonRequests(first.all()).find((r) => r.reason === BalloonReason.PREPARE);
    expect(prepare).toBeDefined();
    expect(prepare!.migrationId).toBe("mig-1");
    expect(ack.migrationId).toBe("mig-1");
    expect(ack.targetBytes).toBe(prepare!.targetBytes);
    // Gives back most of the 500 MiB cache, but stays above the floor.
    expect(prepare!.targetBytes).toBeLessThan(BigInt(512 * MiB));
    expect(prepare!.targetBytes).toBeGreaterThanOrEqual(BigInt(256 * MiB));
    const reqs = first.last.requests;
    expect(reqs.findIndex((r) => r.msg.case === "balloonRequest")).toBeLessThan(reqs.findIndex((r) => r.msg.case === "phaseAck"));
    expect(readFileSync(join(root, "sys/vm/drop_caches"), "utf8")).toBe("1");

    // POSTCOPY_ACTIVE + memory pressure: DEMAND requests, each larger than the last.
    await first.send({ msg: { case: "balloonState", value: { targetBytes: prepare!.targetBytes, actualBytes: prepare!.targetBytes, ramBytes: BigInt(GiB) } } });
    await first.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-1", phase: Phase.POSTCOPY_ACTIVE } } });
    await waitFor("POSTCOPY ack", () => acks(first.all()).find((x) => x.phase === Phase.POSTCOPY_ACTIVE));
    writeFileSync(join(root, "pressure/memory"), "some avg10=25.00 avg60=5.00 avg300=1.00 total=900000\nfull avg10=10.00 avg60=2.00 avg300=0.50 total=400000\n");
    const demands = await waitFor("2 DEMAND requests", () => {
      const d = balloonRequests(first.all()).filter((r) => r.reason === BalloonReason.DEMAND);
      return d.length >= 2 ? d : undefined;
    });
    expect(demands[0]!.targetBytes).toBeGreaterThan(prepare!.targetBytes);
    expect(demands[1]!.targetBytes).toBeGreaterThan(demands[0]!.targetBytes);
    expect(demands.every((d) => d.migrationId === "mig-1" && d.targetBytes <= BigInt(GiB))).toBe(true);
    expect(a.state.phase).toBe("postcopy");

    // The coordinator dies; another comes up on the same port (the "destination") and says the migration completed.
    writeFileSync(join(root, "pressure/memory"), "some avg10=0.00 avg60=0.00 avg300=0.00 total=900000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=400000\n");
    first.kill();
    const second = new FakeCoordinator("host-b", { migrationId: "mig-1", phase: Phase.COMPLETED });
    servers.push(second);
    await second.start(port);
    await waitFor("hello on the new coordinator", () => second.sessions[0]?.requests[0]);
    expect(second.sessions[0]!.requests[0]!.msg.case).toBe("hello");
    await waitFor("host-b welcome", () => a.currentHostId === "host-b");
    const restore = await waitFor("RESTORE", () => balloonRequests(second.all()).find((r) => r.reason === BalloonReason.RESTORE));
    expect(restore.targetBytes).toBe(BigInt(GiB));
    await waitFor("COMPLETED ack", () => acks(second.all()).find((x) => x.phase === Phase.COMPLETED));
    expect(a.state.phase).toBe("steady");
    await waitFor("samples on the new coordinator", () => samples(second.all()).length >= 2);
  });

  it("zero-free: PREPARE -> request -> wait for the balloon -> zero free memory -> ack", async () => {
    const c = new FakeCoordinator("host-z");
    servers.push(c);
    const port = await c.start();
    const events: string[] = [];
    const arena: ZeroArenaFactory = async () => {
      events.push(`start (acks so far: ${acks(c.all()).length})`);
      return {
        grow: async (bytes) => void events.push(`grow ${bytes / MiB}`),
        release: async () => void events.push("release"),
      };
    };
    startAgent(port, new FreeMemoryZeroer({ arena }));
    await waitFor("hello", () => c.sessions[0]?.requests[0]);
    const hello = c.sessions[0]!.requests[0]!;
    if (hello.msg.case !== "hello") throw new Error("hello first");
    expect(hello.msg.value.capabilities).toContain("zero-free");
    await waitFor("a sample", () => samples(c.all()).length >= 1);

    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-z", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    const prepare = await waitFor("PREPARE request", () => balloonRequests(c.all()).find((r) => r.reason === BalloonReason.PREPARE));
    // The balloon is on its way: no ack, no zeroing.
    await c.send({ msg: { case: "balloonState", value: { targetBytes: prepare.targetBytes, actualBytes: BigInt(800 * MiB), ramBytes: BigInt(GiB) } } });
    await new Promise((r) => setTimeout(r, 600));
    expect(acks(c.all())).toEqual([]);
    expect(events).toEqual([]);
    // There: zero (the fixture guest has 357 MiB free: 258 MiB in units of 64), then ack.
    await c.send({ msg: { case: "balloonState", value: { targetBytes: prepare.targetBytes, actualBytes: prepare.targetBytes, ramBytes: BigInt(GiB) } } });
    const ack = await waitFor("PREPARE ack", () => acks(c.all()).find((x) => x.phase === Phase.PREPARE));
    expect(ack).toMatchObject({ migrationId: "mig-z", targetBytes: prepare.targetBytes });
    expect(events[0]).toBe("start (acks so far: 0)");
    expect(events.slice(1)).toEqual(["grow 64", "grow 64", "grow 64", "grow 64", "release"]);
  });

  it("zero-free: a stalled balloon still gets its ack; a later phase stops a zeroing in progress", async () => {
    const c = new FakeCoordinator("host-z2");
    servers.push(c);
    const port = await c.start();
    const events: string[] = [];
    const arena: ZeroArenaFactory = async () => ({
      grow: async (bytes) => {
        events.push(`grow ${bytes / MiB}`);
        await new Promise((r) => setTimeout(r, 150));
      },
      release: async () => void events.push("release"),
    });
    const a = startAgent(port, new FreeMemoryZeroer({ arena }));
    await waitFor("a sample", () => samples(c.all()).length >= 1);
    // The fake coordinator never moves the balloon (actual stays 1 GiB): stalled after 3 s.
    const t0 = Date.now();
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-s", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    await waitFor("the zeroing", () => events.length > 0, 6000);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(2900);
    // The coordinator gave up waiting and migrates: the zeroing stops at once.
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-s", phase: Phase.PRECOPY_PASS, pass: 1 } } });
    await waitFor("released", () => events.includes("release"));
    expect(events.filter((e) => e.startsWith("grow")).length).toBeLessThan(4);
    await waitFor("PRECOPY ack", () => acks(c.all()).find((x) => x.phase === Phase.PRECOPY_PASS));
    expect(a.state.prepareWait).toBeUndefined();
  });

  it("no zeroer: no zero-free capability, the ack follows the request at once", async () => {
    const c = new FakeCoordinator("host-nz");
    servers.push(c);
    const port = await c.start();
    startAgent(port);
    await waitFor("hello", () => c.sessions[0]?.requests[0]);
    const hello = c.sessions[0]!.requests[0]!;
    if (hello.msg.case !== "hello") throw new Error("hello first");
    expect(hello.msg.value.capabilities).not.toContain("zero-free");
  });

  it("decides on every sample but reports a quiet guest's samples only every reportEveryMs", async () => {
    const c = new FakeCoordinator("host-r");
    servers.push(c);
    const port = await c.start();
    // Policy interval 100 ms, report every 500 ms.
    const a = startAgent(port, undefined, 500);
    await waitFor("the first sample, at once", () => samples(c.all()).length >= 1, 3000);
    const t0 = Date.now();
    const prevBefore = a.state.prev?.monotonicMs ?? 0;
    await new Promise((r) => setTimeout(r, 1600));
    const n = samples(c.all()).length - 1;
    // ~16 decisions, ~3 reports.
    expect((a.state.prev?.monotonicMs ?? 0) - prevBefore).toBeGreaterThan(1000);
    expect(n).toBeGreaterThanOrEqual(2);
    expect(n).toBeLessThanOrEqual(4);
    expect(Date.now() - t0).toBeGreaterThan(1500);
  });

  it("keeps retrying with backoff while no coordinator listens, then attaches", async () => {
    const probe = new FakeCoordinator("tmp");
    const port = await probe.start();
    probe.kill();
    startAgent(port);
    await new Promise((r) => setTimeout(r, 600));
    const late = new FakeCoordinator("host-late");
    servers.push(late);
    await late.start(port);
    await waitFor("hello after the coordinator came up", () => late.sessions[0]?.requests[0]?.msg.case === "hello");
  });

  it("stop() ends the stream and the loop", async () => {
    const c = new FakeCoordinator("host-stop");
    servers.push(c);
    const port = await c.start();
    const a = startAgent(port);
    await waitFor("a sample", () => samples(c.all()).length >= 1);
    await a.stop();
    agent = undefined;
    const count = c.all().length;
    await new Promise((r) => setTimeout(r, 300));
    expect(c.all().length).toBe(count);
  });
});

describe("backoff and channel options", () => {
  it.each([
    [0, 0, 50],
    [0, 1, 100],
    [3, 0, 400],
    [3, 1, 800],
    [20, 1, 5000],
    [20, 0, 2500],
  ])("attempt %i, random %f -> %i ms", (attempt, r, want) => {
    expect(backoffDelayMs(attempt, { initialMs: 100, maxMs: 5000, factor: 2 }, () => r)).toBe(want);
  });

  it("keepalive ~2 s with a 1 s timeout, even without calls", () => {
    expect(AGENT_CHANNEL_OPTIONS).toMatchObject({ "grpc.keepalive_time_ms": 2000, "grpc.keepalive_timeout_ms": 1000, "grpc.keepalive_permit_without_calls": 1 });
  });
});
