// The session client against in-process fake coordinators on 127.0.0.1 (real grpc-js both ends), fed from a real guest capture.
import * as grpc from "@grpc/grpc-js";
import { cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect as tcpConnect, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { setTimeout as delay } from "node:timers/promises";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { PageCacheReclaimer } from "../../agent/act.js";
import { DEFAULT_RUNTIME_OPTIONS } from "../../agent/runtime.js";
import { Collector } from "../../agent/sample.js";
import { AGENT_CHANNEL_OPTIONS, AgentSession, grpcConnector, type AgentSessionOptions, type SessionConnector } from "../../agent/session.js";
import type { SessionRequestInit } from "../../agent/wire.js";
import { AgentService, type PhaseEventSchema, type SessionRequest, type SessionResponseSchema } from "../../gen/ballast/v1/agent_pb.js";
import { BalloonReason, Phase } from "../../gen/ballast/v1/common_pb.js";
import { addService, type BidiContext } from "../../shared/grpc-adapter.js";
import type { Logger } from "../../shared/logger.js";
import type { MessageInitShape } from "@bufbuild/protobuf";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
type ResponseInit = MessageInitShape<typeof SessionResponseSchema>;

interface FakeSession {
  ctx: BidiContext<SessionRequest, ResponseInit>;
  requests: SessionRequest[];
  /** performance.now() at its Hello. */
  helloAt: number;
  /** performance.now() when the server ended it (endAfterWelcomeMs). */
  endedAt?: number;
}

interface FakeOptions {
  currentPhase?: MessageInitShape<typeof PhaseEventSchema>;
  /** Refuse attempt n (0-based): the call fails right after its Hello. */
  refuse?: (attempt: number) => boolean;
  /** End a welcomed session from the server this long after the Welcome. */
  endAfterWelcomeMs?: number;
  /** The BalloonState sent after the Welcome. Default: 1 GiB target and actual. */
  balloon?: { targetBytes: bigint; actualBytes: bigint };
}

/** A coordinator that welcomes every agent (or refuses it), records what it sends, and lets the test push messages. */
class FakeCoordinator {
  readonly sessions: FakeSession[] = [];
  /** performance.now() of every Hello, refused ones included. */
  readonly hellos: number[] = [];
  private server: grpc.Server | undefined;
  port = 0;
  constructor(
    readonly hostId: string,
    private readonly o: FakeOptions = {},
  ) {}

  async start(port = 0): Promise<number> {
    const server = new grpc.Server();
    addService(
      server,
      AgentService,
      {
        session: async (ctx) => {
          let s: FakeSession | undefined;
          for await (const req of ctx) {
            if (req.msg.case === "hello") {
              const attempt = this.hellos.length;
              this.hellos.push(performance.now());
              if (this.o.refuse?.(attempt)) throw new Error(`attempt ${attempt} refused`);
              s = { ctx, requests: [req], helloAt: performance.now() };
              this.sessions.push(s);
              const balloon = this.o.balloon ?? { targetBytes: BigInt(GiB), actualBytes: BigInt(GiB) };
              await ctx.send({ msg: { case: "welcome", value: { vmName: "vm1", hostId: this.hostId, currentPhase: this.o.currentPhase } } });
              await ctx.send({ msg: { case: "policy", value: { floorBytes: BigInt(256 * MiB), maxBytes: BigInt(GiB), sampleIntervalMs: 100, steadyState: false } } });
              await ctx.send({ msg: { case: "balloonState", value: { ...balloon, ramBytes: BigInt(GiB) } } });
              if (this.o.endAfterWelcomeMs !== undefined) {
                await delay(this.o.endAfterWelcomeMs);
                s.endedAt = performance.now();
                return;
              }
              continue;
            }
            s?.requests.push(req);
          }
        },
      },
      (err) => ({ code: grpc.status.UNAVAILABLE, details: String(err) }),
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

/** A TCP proxy we control: `blackhole()` makes every open connection go silent (nothing forwarded, nothing closed), like a dead path after a migration. */
class SilentProxy {
  private readonly sockets: Socket[] = [];
  private live: { a: Socket; b: Socket }[] = [];
  private server: Server | undefined;
  port = 0;

  async start(targetPort: number): Promise<number> {
    const server = createServer((a) => {
      const b = tcpConnect(targetPort, "127.0.0.1");
      this.sockets.push(a, b);
      a.pipe(b);
      b.pipe(a);
      for (const s of [a, b]) s.on("error", () => undefined);
      this.live.push({ a, b });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    this.server = server;
    this.port = (server.address() as { port: number }).port;
    return this.port;
  }

  /** Open connections stop forwarding in both directions and stop reading, but stay open. New connections work. */
  blackhole(): void {
    for (const { a, b } of this.live.splice(0)) {
      a.unpipe(b);
      b.unpipe(a);
      a.pause();
      b.pause();
    }
  }

  close(): void {
    for (const s of this.sockets) s.destroy();
    this.server?.close();
  }
}

async function waitFor<T>(what: string, fn: () => T | undefined | false, timeoutMs = 8000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = fn();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await delay(20);
  }
}

const sleepMs = (ms: number) => delay(ms);
const balloonRequests = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "balloonRequest" ? [r.msg.value] : []));
const acks = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "phaseAck" ? [r.msg.value] : []));
const samples = (reqs: SessionRequest[]) => reqs.flatMap((r) => (r.msg.case === "sample" ? [r.msg.value] : []));

const QUIET_PSI = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
const HIGH_PSI = "some avg10=25.00 avg60=5.00 avg300=1.00 total=900000\nfull avg10=10.00 avg60=2.00 avg300=0.50 total=400000\n";

let root = "";
let sys = "";
const servers: FakeCoordinator[] = [];
const proxies: SilentProxy[] = [];
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
  for (const p of proxies.splice(0)) p.close();
  writeFileSync(join(root, "pressure/memory"), QUIET_PSI);
});

afterAll(() => rmSync(root, { recursive: true, force: true }));

function startAgent(port: number, extra: Partial<AgentSessionOptions> & { reportEveryMs?: number } = {}): AgentSession {
  const { reportEveryMs = 0, ...rest } = extra;
  const a = new AgentSession({
    coordinator: `127.0.0.1:${port}`,
    vmId: "vm1-agent",
    collector: new Collector({ procRoot: root, sysRoot: sys }),
    reclaimer: new PageCacheReclaimer({ procRoot: root, sysRoot: sys, sync: async () => undefined }),
    runtime: { ...DEFAULT_RUNTIME_OPTIONS, sampleIntervalMs: 100, fastSampleIntervalMs: 50, reportEveryMs },
    backoff: { initialMs: 50, maxMs: 400 },
    ...rest,
  });
  a.start();
  agent = a;
  return a;
}

/** The real connector, with some sends replaced: `fate` returns "hang" (never settles), "fail" (rejects) or undefined (real send). */
function meddlingConnector(fate: (request: SessionRequestInit, attach: number) => "hang" | "fail" | undefined): SessionConnector {
  let attaches = 0;
  return (coordinator, channelOptions) => {
    const attach = ++attaches;
    const real = grpcConnector(coordinator, channelOptions);
    return {
      close: real.close,
      stream: {
        send: (request) => {
          const f = fate(request, attach);
          if (f === "hang") return new Promise<void>(() => {});
          if (f === "fail") return Promise.reject(new Error("write failed"));
          return real.stream.send(request);
        },
        end: () => real.stream.end(),
        cancel: () => real.stream.cancel(),
        [Symbol.asyncIterator]: () => real.stream[Symbol.asyncIterator](),
      },
    };
  };
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
    expect(hello.msg.value.capabilities).not.toContain("zero-free");

    // Samples arrive every Policy interval, with the agent's estimates filled in.
    await waitFor("3 samples", () => samples(first.all()).length >= 3);
    const sample = samples(first.all())[0]!;
    expect(sample.memTotalBytes).toBe(981700n * 1024n);
    expect(sample.workingSetBytes).toBeGreaterThan(0n);
    expect(sample.unreclaimableBytes).toBeGreaterThan(0n);
    expect(a.currentHostId).toBe("host-a");

    // PREPARE: drop caches, BalloonRequest(PREPARE, migration id), then at once PhaseAck with the same target
    // (the fake never moves the balloon: the ack must not wait for it).
    await first.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-1", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    const ack = await waitFor("PREPARE ack", () => acks(first.all()).find((x) => x.phase === Phase.PREPARE), 2000);
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
    writeFileSync(join(root, "pressure/memory"), HIGH_PSI);
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
    const second = new FakeCoordinator("host-b", { currentPhase: { migrationId: "mig-1", phase: Phase.COMPLETED } });
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

  it("decides on every sample but reports a quiet guest's samples only every reportEveryMs", async () => {
    const c = new FakeCoordinator("host-r");
    servers.push(c);
    const port = await c.start();
    // Policy interval 100 ms, report every 500 ms.
    const a = startAgent(port, { reportEveryMs: 500 });
    await waitFor("the first sample, at once", () => samples(c.all()).length >= 1, 3000);
    const t0 = Date.now();
    const prevBefore = a.state.prev?.monotonicMs ?? 0;
    await sleepMs(1600);
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
    await sleepMs(600);
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
    await sleepMs(300);
    expect(c.all().length).toBe(count);
  });
});

describe("keepalive: a connection that goes silent without closing", () => {
  it("is noticed by keepalive alone, and the agent re-attaches (well under 8 s; without keepalive it never does)", async () => {
    const c = new FakeCoordinator("host-k");
    servers.push(c);
    const proxy = new SilentProxy();
    proxies.push(proxy);
    const proxyPort = await proxy.start(await c.start());
    // The production channel options: nothing passed over AGENT_CHANNEL_OPTIONS.
    startAgent(proxyPort, { backoff: { initialMs: 100, maxMs: 400 } });
    await waitFor("attached, sampling", () => samples(c.all()).length >= 2);
    // A while on a healthy path first: keepalive pings (every 2 s) go through and are answered.
    await sleepMs(2500);

    // The path dies the way it does after a live migration: no FIN, no RST, just nothing.
    const before = c.sessions.length;
    proxy.blackhole();
    const t0 = performance.now();
    await waitFor("a re-attach after the path went silent", () => c.sessions.length > before, 8000);
    const noticedMs = performance.now() - t0;
    // Nothing arrived on the old path: only a keepalive ping without its ack (2 s + 1 s) can have ended it.
    expect(noticedMs).toBeGreaterThan(900);
    expect(noticedMs).toBeLessThan(8000);
    await waitFor("samples on the new session", () => samples(c.last.requests).length >= 1, 3000);
  });

  it("the channel options it relies on", () => {
    expect(AGENT_CHANNEL_OPTIONS).toMatchObject({ "grpc.keepalive_time_ms": 2000, "grpc.keepalive_timeout_ms": 1000, "grpc.keepalive_permit_without_calls": 1 });
  });
});

describe("re-attach backoff (shared/retry.ts BACKOFF.attach, 100 ms growing; here 100 ms to 1 s)", () => {
  const gaps = (t: number[]) => t.slice(1).map((x, i) => x - t[i]!);

  it("grows, has a floor, and never hammers a coordinator that refuses every session", async () => {
    const c = new FakeCoordinator("host-refuse", { refuse: () => true });
    servers.push(c);
    const port = await c.start();
    startAgent(port, { backoff: { initialMs: 100, maxMs: 1000 } });
    await waitFor("7 attempts", () => c.hellos.length >= 7, 8000);
    const t = c.hellos;
    const g = gaps(t);
    const first3 = t[3]! - t[0]!;
    const next3 = t[6]! - t[3]!;
    // Floor: the first three delays add up to at least 2^2·tanh(√8)/1.4 × 100 ms = 283 ms, whatever the jitter
    // (without a backoff the three attempts take ~30 ms).
    expect(first3, `gaps ${g.map(Math.round).join(", ")} ms`).toBeGreaterThanOrEqual(250);
    // Growth: the next three delays add at least 552 ms more than the first three (the attempts' own time cancels out).
    expect(next3 - first3, `gaps ${g.map(Math.round).join(", ")} ms`).toBeGreaterThan(400);
    // No gap above the 1 s ceiling (plus the attempt itself).
    expect(Math.max(...g)).toBeLessThan(1000 + 500);
  });

  it("starts over from the first delay after a session that got its Welcome", async () => {
    // Refuse 5 attempts, welcome the 6th and end it after 300 ms, then refuse again.
    const c = new FakeCoordinator("host-reset", { refuse: (n) => n !== 5, endAfterWelcomeMs: 300 });
    servers.push(c);
    const port = await c.start();
    startAgent(port, { backoff: { initialMs: 100, maxMs: 1000 } });
    await waitFor("2 attempts after the welcomed session", () => c.hellos.length >= 8, 10_000);
    const ended = c.sessions[0]!.endedAt!;
    expect(ended).toBeDefined();
    // Reset: the first two delays again, at most 283 ms together (plus the attempts' own time). Without
    // the reset they would be the 6th and 7th delays, at least 1 s together (capped at 1 s each).
    const twoDelays = c.hellos[7]! - ended;
    expect(twoDelays, `after the end: ${Math.round(c.hellos[6]! - ended)} and ${Math.round(twoDelays)} ms`).toBeLessThan(900);
  });
});

describe("one stuck or failing step never silences the agent (the starved post-copy agent)", () => {
  it("a send that never completes: the step is abandoned at its deadline, the agent re-attaches and carries on", async () => {
    const c = new FakeCoordinator("host-stuck");
    servers.push(c);
    const port = await c.start();
    let reports = 0;
    // The third sample of the first attach is written into a transport that never completes the write.
    const connect = meddlingConnector((req, attach) => (attach === 1 && req.msg?.case === "sample" && ++reports === 3 ? "hang" : undefined));
    startAgent(port, { connect, stepTimeoutMs: 400 });
    await waitFor("a re-attach after the stuck write", () => c.sessions.length >= 2, 5000);
    await waitFor("samples on the new session", () => samples(c.last.requests).length >= 2, 3000);
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-s", phase: Phase.COMPLETED } } });
    await waitFor("COMPLETED ack on the new session", () => acks(c.last.requests).find((x) => x.phase === Phase.COMPLETED), 3000);
  });

  it("the same during a reconnect: a stuck write on the old stream does not hold up the new coordinator", async () => {
    const first = new FakeCoordinator("host-src");
    servers.push(first);
    const port = await first.start();
    let wedged = false;
    let hung = 0;
    // From some point on, writes on the first stream never complete; then its coordinator goes away.
    const connect = meddlingConnector((_req, attach) => (attach === 1 && wedged && ++hung > 0 ? "hang" : undefined));
    startAgent(port, { connect, stepTimeoutMs: 400 });
    await waitFor("sampling", () => samples(first.all()).length >= 2);
    wedged = true;
    await waitFor("a write stuck", () => hung >= 1, 2000);
    first.kill();
    const second = new FakeCoordinator("host-dst", { currentPhase: { migrationId: "mig-r", phase: Phase.POSTCOPY_ACTIVE } });
    servers.push(second);
    await second.start(port);
    await waitFor("POSTCOPY ack at the new coordinator", () => acks(second.all()).find((x) => x.phase === Phase.POSTCOPY_ACTIVE), 5000);
    await waitFor("samples at the new coordinator", () => samples(second.all()).length >= 2, 3000);
  });

  /** Attaches to a source, goes through PREPARE there, kills it: the agent then re-attaches to whatever listens on `port`. */
  async function preparedAtSource(port: number | undefined, extra: Partial<AgentSessionOptions> = {}) {
    const source = new FakeCoordinator("host-src");
    servers.push(source);
    const p = await source.start(port);
    const a = startAgent(p, extra);
    await waitFor("sampling at the source", () => samples(source.all()).length >= 2);
    await source.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-w", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    await waitFor("PREPARE ack at the source", () => acks(source.all()).find((x) => x.phase === Phase.PREPARE), 3000);
    const prepare = balloonRequests(source.all()).find((r) => r.reason === BalloonReason.PREPARE)!;
    source.kill();
    return { a, port: p, prepareTarget: prepare.targetBytes };
  }

  it("a Welcome whose effects fail (post-copy arrival, DEMAND write rejected): the agent keeps sampling and asking, and acks COMPLETED", async () => {
    // The bench signature: post-copy arrival, starved, one DEMAND, COMPLETED acked, then nothing.
    let demandsAtDestination = 0;
    const connect = meddlingConnector((req, attach) => (attach >= 2 && req.msg?.case === "balloonRequest" && ++demandsAtDestination === 1 ? "fail" : undefined));
    const { port, prepareTarget } = await preparedAtSource(undefined, { connect });
    writeFileSync(join(root, "pressure/memory"), HIGH_PSI);
    // The destination knows the balloon as the source left it.
    const dst = new FakeCoordinator("host-dst", { currentPhase: { migrationId: "mig-w", phase: Phase.POSTCOPY_ACTIVE }, balloon: { targetBytes: prepareTarget, actualBytes: prepareTarget } });
    servers.push(dst);
    await dst.start(port);
    await waitFor("the Welcome's DEMAND was attempted", () => demandsAtDestination >= 1, 5000);
    // Post-copy goes on: the ticks must go on too, asking for more while the guest is starved.
    await waitFor("DEMAND requests after the failed one", () => balloonRequests(dst.all()).some((r) => r.reason === BalloonReason.DEMAND), 3000);
    await dst.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-w", phase: Phase.COMPLETED } } });
    const acked = await waitFor("COMPLETED ack", () => {
      const i = dst.last.requests.findIndex((r) => r.msg.case === "phaseAck" && r.msg.value.phase === Phase.COMPLETED);
      return i >= 0 ? i : undefined;
    }, 3000);
    await waitFor("samples after the COMPLETED ack", () => samples(dst.last.requests.slice(acked + 1)).length >= 3, 3000);
    expect(dst.sessions).toHaveLength(1);
  });

  it("a log sink that throws (pino does when stdout fails) never skips a request or an ack", async () => {
    const c = new FakeCoordinator("host-log");
    servers.push(c);
    const port = await c.start();
    const enospc = () => {
      throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
    };
    const logger = { trace: enospc, debug: enospc, info: enospc, warn: enospc, error: enospc, fatal: enospc } as unknown as Logger;
    startAgent(port, { logger });
    await waitFor("samples", () => samples(c.all()).length >= 2, 3000);
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-l", phase: Phase.PREPARE, deadlineUnixMs: BigInt(Date.now() + 15_000) } } });
    await waitFor("PREPARE request and ack", () => balloonRequests(c.all()).some((r) => r.reason === BalloonReason.PREPARE) && acks(c.all()).some((x) => x.phase === Phase.PREPARE), 3000);
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-l", phase: Phase.POSTCOPY_ACTIVE } } });
    writeFileSync(join(root, "pressure/memory"), HIGH_PSI);
    await waitFor("a DEMAND under pressure", () => balloonRequests(c.all()).some((r) => r.reason === BalloonReason.DEMAND), 3000);
    await c.send({ msg: { case: "phaseEvent", value: { migrationId: "mig-l", phase: Phase.COMPLETED } } });
    await waitFor("COMPLETED ack", () => acks(c.all()).find((x) => x.phase === Phase.COMPLETED), 3000);
    const n = samples(c.all()).length;
    await waitFor("samples keep coming", () => samples(c.all()).length >= n + 3, 3000);
  });
});
