/**
 * Coordinator cost with many agents: phase-event fan-out latency, CPU and
 * RSS while N agents sample at 1 Hz.
 *
 * Layout (everything on 127.0.0.1):
 *
 *   this process                               child process (bench/simulated-agents.ts)
 *   ┌────────────────────────────┐   gRPC     ┌──────────────────────────────────┐
 *   │ coordinator (startCoordin- │◀──────────▶│ N simulated agents, one TCP conn │
 *   │ ator, N VMs, shared agent  │  N streams │ each: hello, MemorySample @ Hz,  │
 *   │ listener) + bench harness  │            │ records PhaseEvent arrival times │
 *   └────────────────────────────┘            └──────────────────────────────────┘
 *
 * Why the coordinator runs in-process: the bench must broadcast phase events
 * without a real migration, and the product has (on purpose) no RPC for
 * that. So the coordinator is built with the real `startCoordinator` from a
 * config parsed by the real `parseCoordinatorConfig`, and the harness calls
 * `coordinator.domain.hub.sendPhase(vm, …)` for every VM. Its CPU and RSS
 * are this process's, so they include the harness; the harness alone is
 * measured first (before the coordinator exists) and reported next to the
 * totals rather than subtracted.
 *
 * The VMs' QMP sockets do not exist: each VmRuntime retries with backoff up
 * to 5 s, as for VMs whose QEMU is not up yet. That retry cost is measured on
 * its own ("coordinator idle": N VMs, no agents) after the backoff settled.
 *
 * Latency is measured on one clock: `performance.timeOrigin +
 * performance.now()` in both processes (same host clock); an IPC ping-pong
 * estimates any offset between the two processes' origins and is reported.
 */
import { fork, type ChildProcess } from "node:child_process";
import { mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { parseCoordinatorConfig } from "../coordinator/config.js";
import { startCoordinator, type Coordinator } from "../coordinator/server.js";
import { createLogger, type Logger } from "../shared/logger.js";
import { FANOUT_MIGRATION_ID, type AgentCounters, type FromAgents, type ToAgents } from "./simulated-agents.js";
import { round, roundSummary, summarize, type Summary } from "./stats.js";
import { sleep } from "../shared/retry.js";

const ROOT = resolve(import.meta.dirname, "..");
const MiB = 1024 * 1024;

/** Options of {@link runCoordinatorFanout}. */
export interface FanoutOptions {
  /** Simulated agents, one VM each. Default 500. */
  sessions?: number;
  /** Samples per second per agent. Default 1. */
  sampleHz?: number;
  /** Length of the steady sampling window whose CPU is measured. Default 30. */
  seconds?: number;
  /** Phase-event broadcasts to all sessions. Default 20. */
  fanouts?: number;
  /** Progress lines for people. */
  onProgress?: (line: string) => void;
  /** Wait after starting the coordinator so the QMP retry backoff reaches its 5 s ceiling. Default 8. */
  settleSeconds?: number;
  /** Coordinator-idle window (N VMs, no agents) after settling. Default 5 (one QMP retry period). */
  idleSeconds?: number;
  /** Samples flow this long after attach before the steady window starts. Default 3. */
  warmupSeconds?: number;
  /** Mean gap between fan-outs; each gap gets ±50 % jitter so fan-outs hit random points of the sampling cycle. Default 500. */
  fanoutGapMs?: number;
  /**
   * Processes the simulated agents are split over. Default 1. More processes
   * receive a broadcast in parallel (less harness queueing in the latency)
   * but compete with the coordinator for this 2-core machine's CPUs.
   */
  agentProcesses?: number;
  /** Coordinator log level; logs go to /dev/null (the cost of formatting them stays in). Default "info". */
  logLevel?: string;
}

/** What {@link runCoordinatorFanout} measured. Times in ms, sizes in MiB, CPU % of one core. */
export interface FanoutResult {
  sessions: number;
  sessionsAttached: number;
  sampleHz: number;
  fanouts: number;
  agentProcesses: number;
  /** From the start of a broadcast (the harness begins the sendPhase loop) to each agent's arrival: the fan-out latency. */
  latencyMs: Summary;
  /** From each VM's own sendPhase call to its agent's arrival. */
  perSendLatencyMs: Summary;
  /** Per broadcast: the synchronous sendPhase loop over all VMs. */
  sendLoopMs: Summary;
  /** Per broadcast: until every sendPhase promise resolved (gRPC write callbacks). */
  flushMs: Summary;
  /** Per broadcast: until its last agent received it. */
  broadcastCompleteMs: Summary;
  deliveries: {
    expected: number;
    arrived: number;
    /** sendPhase returned false (no session or the write failed). */
    sendFailed: number;
    /** Sent but never seen by the agent within the grace period. */
    missing: number;
  };
  cpu: {
    /** This process before the coordinator existed (harness + loaded modules, idle). */
    harnessIdlePct: number;
    /** Coordinator with N VMs and no agents, QMP retries at their 5 s ceiling. */
    coordinatorIdlePct: number;
    /** Coordinator during the steady sampling window (includes the harness). */
    steadyPct: number;
    steadyMs: number;
    /** steadyMs / samples handled. */
    msPerSample: number;
    /** (steadyMs − coordinatorIdle CPU over the same time) / samples handled: the cost sampling adds. */
    msPerSampleNet: number;
    /** Coordinator while broadcasting (sampling continues). */
    fanoutPhasePct: number;
    /** The simulated agents' process(es) during the steady window (context: they share the 2 cores). */
    agentsProcessPct: number;
  };
  samples: {
    /** Samples the agents wrote during the steady window (write callback succeeded). */
    handled: number;
    perSecond: number;
    writeErrors: number;
  };
  rssMiB: {
    harnessBaseline: number;
    coordinatorIdle: number;
    /** Max during the steady window (polled every 500 ms). */
    steadyMax: number;
    end: number;
    /** Sum over the agents' processes. */
    agentsProcessMax: number;
  };
  /** This process's event-loop delay during the steady window. */
  eventLoopDelayMs: { p50: number; p99: number; max: number };
  /** Estimated (agents process − this process) clock offset (the largest over the agents' processes) and the ping RTT that bounds it. */
  clock: { offsetMs: number; rttMs: number };
  /** Agent sessions that ended during the run (should be 0). */
  disconnects: number;
  /** The actual steady window, seconds. */
  seconds: number;
  timings: { attachMs: number; totalMs: number };
  target: { p99FanoutMs: number; met: boolean };
  notes: string[];
}

const now = () => performance.timeOrigin + performance.now();

/** A logger writing to /dev/null, opened once per process (pino may still write after a run ends). */
let nullFd: number | undefined;
function nullLogger(level: string): Logger {
  nullFd ??= openSync("/dev/null", "w");
  return createLogger({ name: "ballast-coordinator", level, fd: nullFd });
}

function cpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

const rssMiB = () => process.memoryUsage().rss / MiB;

/** utime+stime of a process in ms from /proc/<pid>/stat (10 ms resolution), or NaN. */
function procCpuMs(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
    return ((Number(f[11]) + Number(f[12])) * 1000) / 100;
  } catch {
    return NaN;
  }
}

function procRssMiB(pid: number | undefined): number {
  if (!pid) return NaN;
  try {
    const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** The simulated agents child, with request/response over IPC. */
class AgentsProcess {
  private readonly waiters: { pred: (m: FromAgents) => boolean; resolve: (m: FromAgents) => void; reject: (e: Error) => void }[] = [];
  private readonly exited: Promise<void>;
  private stderr = "";
  private constructor(readonly child: ChildProcess) {
    child.on("message", (raw: unknown) => {
      const msg = raw as FromAgents;
      const i = this.waiters.findIndex((w) => w.pred(msg));
      if (i >= 0) this.waiters.splice(i, 1)[0]?.resolve(msg);
    });
    child.stderr?.on("data", (b: Buffer) => {
      this.stderr = (this.stderr + b.toString()).slice(-4000);
    });
    this.exited = new Promise((r) =>
      child.once("exit", (code, signal) => {
        for (const w of this.waiters.splice(0)) w.reject(new Error(`coordinator-fanout: simulated agents exited (${code ?? signal}): ${this.stderr.slice(-800)}`));
        r();
      }),
    );
  }

  static async start(lifetimeMs: number): Promise<AgentsProcess> {
    const child = fork(join(ROOT, "bench/simulated-agents.ts"), [JSON.stringify({ lifetimeMs })], {
      cwd: ROOT,
      execArgv: ["--import", "tsx"],
      stdio: ["ignore", "ignore", "pipe", "ipc"],
      env: { ...process.env, NODE_OPTIONS: "" },
    });
    const p = new AgentsProcess(child);
    try {
      await p.request(undefined, (m) => m.type === "loaded", 60_000, "simulated agents loaded");
    } catch (err) {
      await p.stop();
      throw err;
    }
    return p;
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  request<T extends FromAgents["type"]>(cmd: ToAgents | undefined, pred: (m: FromAgents) => boolean, timeoutMs: number, what: string): Promise<Extract<FromAgents, { type: T }>> {
    return new Promise((resolvePromise, reject) => {
      if (this.child.exitCode !== null || this.child.signalCode !== null) {
        reject(new Error(`coordinator-fanout: simulated agents already exited, cannot wait for ${what}: ${this.stderr.slice(-800)}`));
        return;
      }
      const t = setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new Error(`coordinator-fanout: timed out after ${timeoutMs} ms waiting for ${what}; agents stderr: ${this.stderr.slice(-800)}`));
      }, timeoutMs);
      const w = {
        pred,
        resolve: (m: FromAgents) => {
          clearTimeout(t);
          resolvePromise(m as Extract<FromAgents, { type: T }>);
        },
        reject: (e: Error) => {
          clearTimeout(t);
          reject(e);
        },
      };
      this.waiters.push(w);
      if (cmd) this.child.send(cmd);
    });
  }

  counters(): Promise<AgentCounters> {
    return this.request<"counters">({ type: "counters" }, (m) => m.type === "counters", 10_000, "counters").then((m) => m.counters);
  }

  /** Estimates (child clock − our clock) from the ping with the smallest round trip. */
  async clockOffset(pings = 15): Promise<{ offsetMs: number; rttMs: number }> {
    let best = { offsetMs: NaN, rttMs: Infinity };
    for (let id = 0; id < pings; id++) {
      const t0 = now();
      const m = await this.request<"clock">({ type: "clock", id }, (x) => x.type === "clock" && x.id === id, 5_000, "clock ping");
      const t1 = now();
      if (t1 - t0 < best.rttMs) best = { offsetMs: m.now - (t0 + t1) / 2, rttMs: t1 - t0 };
    }
    return best;
  }

  /** Asks the child to stop, then SIGTERM, then SIGKILL: always by this child's pid. */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    try {
      if (this.child.connected) this.child.send({ type: "stop" } satisfies ToAgents);
    } catch {
      // Channel already gone; the signals below still work.
    }
    const escalate = setTimeout(() => this.child.kill("SIGTERM"), 3_000);
    const kill = setTimeout(() => this.child.kill("SIGKILL"), 6_000);
    await this.exited;
    clearTimeout(escalate);
    clearTimeout(kill);
  }
}

/** Several agents' processes, each with a contiguous slice of the VMs. */
class AgentsPool {
  private constructor(readonly procs: AgentsProcess[]) {}

  static async start(count: number, lifetimeMs: number): Promise<AgentsPool> {
    const settled = await Promise.allSettled(Array.from({ length: count }, () => AgentsProcess.start(lifetimeMs)));
    const procs = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) {
      await Promise.all(procs.map((p) => p.stop()));
      throw failed.reason;
    }
    return new AgentsPool(procs);
  }

  /** Attaches vmIds[i] as agent index i, split in contiguous slices over the processes. */
  async attach(address: string, vmIds: string[], sampleHz: number, timeoutMs: number): Promise<{ ok: number; failed: number; errors: string[]; ms: number }> {
    const per = Math.ceil(vmIds.length / this.procs.length);
    const replies = await Promise.all(
      this.procs.map((p, j) =>
        p.request<"attached">(
          { type: "attach", address, vmIds: vmIds.slice(j * per, (j + 1) * per), firstIndex: j * per, sampleHz, concurrency: 32, timeoutMs: 30_000 },
          (m) => m.type === "attached",
          timeoutMs,
          "agents attached",
        ),
      ),
    );
    return {
      ok: replies.reduce((a, r) => a + r.ok, 0),
      failed: replies.reduce((a, r) => a + r.failed, 0),
      errors: replies.flatMap((r) => r.errors).slice(0, 5),
      ms: Math.max(...replies.map((r) => r.ms)),
    };
  }

  async counters(): Promise<AgentCounters> {
    const all = await Promise.all(this.procs.map((p) => p.counters()));
    return all.reduce((a, c) => ({
      samplesSent: a.samplesSent + c.samplesSent,
      sampleErrors: a.sampleErrors + c.sampleErrors,
      streamsEnded: a.streamsEnded + c.streamsEnded,
      phaseEvents: a.phaseEvents + c.phaseEvents,
    }));
  }

  /** The largest offset (by magnitude) over the processes, with its RTT. */
  async clockOffset(): Promise<{ offsetMs: number; rttMs: number }> {
    let worst = { offsetMs: 0, rttMs: 0 };
    for (const p of this.procs) {
      const c = await p.clockOffset();
      if (Math.abs(c.offsetMs) >= Math.abs(worst.offsetMs)) worst = c;
    }
    return worst;
  }

  async collect(): Promise<{ data: number[]; unknown: number }> {
    const all = await Promise.all(this.procs.map((p) => p.request<"arrivals">({ type: "collect" }, (m) => m.type === "arrivals", 30_000, "arrivals")));
    return { data: all.flatMap((r) => r.data), unknown: all.reduce((a, r) => a + r.unknown, 0) };
  }

  cpuMs(): number {
    return this.procs.reduce((a, p) => a + procCpuMs(p.pid), 0);
  }

  rssMiB(): number {
    return this.procs.reduce((a, p) => a + procRssMiB(p.pid), 0);
  }

  async stop(): Promise<void> {
    await Promise.all(this.procs.map((p) => p.stop()));
  }
}

/**
 * Runs the fan-out bench. Every process and server it starts is stopped
 * before it resolves or rejects.
 */
export async function runCoordinatorFanout(opts: FanoutOptions = {}): Promise<FanoutResult> {
  const sessions = opts.sessions ?? 500;
  const sampleHz = opts.sampleHz ?? 1;
  const seconds = opts.seconds ?? 30;
  const fanouts = opts.fanouts ?? 20;
  const settleSeconds = opts.settleSeconds ?? 8;
  const idleSeconds = opts.idleSeconds ?? 5;
  const warmupSeconds = opts.warmupSeconds ?? 3;
  const gapMs = opts.fanoutGapMs ?? 500;
  const progress = opts.onProgress ?? (() => {});
  const agentProcesses = opts.agentProcesses ?? 1;
  if (!(Number.isInteger(agentProcesses) && agentProcesses >= 1 && agentProcesses <= 8)) throw new RangeError(`agentProcesses must be an integer in [1, 8], got ${agentProcesses}`);
  if (!(Number.isInteger(sessions) && sessions >= 1 && sessions <= 5000)) throw new RangeError(`sessions must be an integer in [1, 5000], got ${sessions}`);
  if (!(sampleHz > 0 && sampleHz <= 10)) throw new RangeError(`sampleHz must be in (0, 10], got ${sampleHz}`);
  if (!(seconds > 0 && seconds <= 600)) throw new RangeError(`seconds must be in (0, 600], got ${seconds}`);
  if (!(Number.isInteger(fanouts) && fanouts >= 1 && fanouts <= 1000)) throw new RangeError(`fanouts must be an integer in [1, 1000], got ${fanouts}`);
  if (!(gapMs >= 10 && gapMs <= 10_000)) throw new RangeError(`fanoutGapMs must be in [10, 10000], got ${gapMs}`);

  const attachTimeoutMs = 60_000 + sessions * 50;
  const graceMs = 2_000;
  // Upper bound of the whole run: the agents' child exits by itself after it, even if we die.
  const budgetMs = 60_000 + (settleSeconds + idleSeconds + warmupSeconds + seconds) * 1000 + attachTimeoutMs + fanouts * gapMs * 1.5 + graceMs;
  const started = now();
  const notes: string[] = [
    "The coordinator runs in this process (startCoordinator), so its CPU and RSS include the bench harness; the harness alone is reported as harnessIdlePct / rssMiB.harnessBaseline.",
    "QMP sockets do not exist: every VM retries QMP with backoff up to 5 s; coordinatorIdlePct is that cost alone.",
    `The simulated agents share ${agentProcesses === 1 ? "one process" : `${agentProcesses} processes`} (one event loop each): arrival times include that process's own receive work for all its agents' messages of a broadcast, so latencies are an upper bound of what separate guests would see.`,
  ];

  const work = mkdtempSync(join(tmpdir(), "ballast-fanout-"));
  let agents: AgentsPool | undefined;
  let coordinator: Coordinator | undefined;
  // The histogram records whole timer intervals, so the resolution is subtracted below.
  const eldResolutionMs = 10;
  const eld = monitorEventLoopDelay({ resolution: eldResolutionMs });
  try {
    progress(`starting the simulated agents' process${agentProcesses > 1 ? `es (${agentProcesses})` : ""}`);
    agents = await AgentsPool.start(agentProcesses, budgetMs);

    // 1. The harness alone, idle (modules loaded, agents' child started but idle).
    await sleep(500);
    const harnessRss = rssMiB();
    let c0 = cpuMs();
    let t0 = now();
    await sleep(2_000);
    const harnessIdlePct = ((cpuMs() - c0) / (now() - t0)) * 100;

    // 2. The coordinator, from a config parsed like the file would be.
    const config = parseCoordinatorConfig(
      {
        hostId: "bench-host",
        listen: "127.0.0.1:0",
        agentListen: "127.0.0.1:0",
        vms: Array.from({ length: sessions }, (_, i) => {
          const name = `vm${String(i).padStart(4, "0")}`;
          return { name, agentId: name, qmpSocket: join(work, `${name}.qmp`) };
        }),
        defaults: { sampleIntervalMs: Math.max(100, Math.round(1000 / sampleHz)) },
      },
      "bench-fanout-config",
      work,
    );
    const vmNames = config.vms.map((v) => v.name);
    progress(`starting the coordinator with ${sessions} VMs (QMP sockets absent: retry backoff up to 5 s)`);
    coordinator = await startCoordinator(config, nullLogger(opts.logLevel ?? "info"));
    const hub = coordinator.domain.hub;
    const agentAddress = coordinator.agentAddresses.get("*");
    if (!agentAddress) throw new Error("coordinator-fanout: the coordinator has no shared agent listener");
    const disconnectsBefore = hub.detachedCount;

    progress(`letting the QMP retry backoff settle for ${settleSeconds} s`);
    await sleep(settleSeconds * 1000);
    c0 = cpuMs();
    t0 = now();
    await sleep(idleSeconds * 1000);
    const coordinatorIdlePct = ((cpuMs() - c0) / (now() - t0)) * 100;
    const coordinatorIdleRss = rssMiB();

    // 3. Attach every agent.
    progress(`attaching ${sessions} agents to ${agentAddress}`);
    const attached = await agents.attach(agentAddress, vmNames, sampleHz, attachTimeoutMs);
    if (attached.failed > 0) notes.push(`${attached.failed} agents failed to attach, e.g. ${attached.errors.join("; ")}`);
    const sessionsAttached = hub.size;
    progress(`${attached.ok}/${sessions} agents attached in ${Math.round(attached.ms)} ms (hub sees ${sessionsAttached})`);
    if (sessionsAttached === 0) throw new Error(`coordinator-fanout: no agent attached: ${attached.errors.join("; ")}`);
    const clock = await agents.clockOffset();
    if (Math.abs(clock.offsetMs) > 1) notes.push(`the two processes' clocks differ by ~${round(clock.offsetMs, 2)} ms (RTT ${round(clock.rttMs, 2)} ms): latencies carry that error`);

    // 4. Steady sampling window.
    await sleep(warmupSeconds * 1000);
    progress(`steady sampling window: ${seconds} s at ${sampleHz} Hz`);
    let rssMax = rssMiB();
    let agentsRssMax = agents.rssMiB();
    const rssPoll = setInterval(() => {
      rssMax = Math.max(rssMax, rssMiB());
      agentsRssMax = Math.max(agentsRssMax, agents?.rssMiB() ?? NaN);
    }, 500);
    try {
      const k0 = await agents.counters();
      const a0 = agents.cpuMs();
      eld.reset();
      eld.enable();
      c0 = cpuMs();
      t0 = now();
      await sleep(seconds * 1000);
      const steadyMs = cpuMs() - c0;
      const wallMs = now() - t0;
      eld.disable();
      const a1 = agents.cpuMs();
      const k1 = await agents.counters();
      const handled = k1.samplesSent - k0.samplesSent;
      const writeErrors = k1.sampleErrors - k0.sampleErrors;
      const steadyPct = (steadyMs / wallMs) * 100;
      const msPerSample = handled > 0 ? steadyMs / handled : NaN;
      const msPerSampleNet = handled > 0 ? (steadyMs - (coordinatorIdlePct / 100) * wallMs) / handled : NaN;
      const lag = (ns: number) => Math.max(0, ns / 1e6 - eldResolutionMs);
      const eventLoopDelayMs = { p50: lag(eld.percentile(50)), p99: lag(eld.percentile(99)), max: lag(eld.max) };

      // 5. Fan-outs while sampling continues.
      progress(`broadcasting ${fanouts} phase events to ${sessionsAttached} sessions`);
      const starts: number[] = [];
      const sendTimes: Float64Array[] = [];
      const loopMs: number[] = [];
      const flushMs: number[] = [];
      const sentOk: Uint8Array[] = [];
      let sendFailed = 0;
      const fc0 = cpuMs();
      const ft0 = now();
      for (let k = 0; k < fanouts; k++) {
        await sleep(gapMs * (0.5 + Math.random()));
        const times = new Float64Array(vmNames.length);
        const ok = new Uint8Array(vmNames.length);
        const pending: Promise<boolean>[] = new Array(vmNames.length);
        const start = now();
        for (let i = 0; i < vmNames.length; i++) {
          times[i] = now();
          pending[i] = coordinator.domain.vms.get(vmNames[i] as string)!.sendPhaseToAgent({
            migrationId: FANOUT_MIGRATION_ID,
            phase: Phase.PRECOPY_PASS,
            mode: MigrationMode.PRECOPY,
            pass: k + 1,
            deadlineUnixMs: 0,
            error: "",
          });
        }
        loopMs.push(now() - start);
        const results = await Promise.all(pending);
        flushMs.push(now() - start);
        results.forEach((r, i) => {
          if (r) ok[i] = 1;
          else sendFailed++;
        });
        starts.push(start);
        sendTimes.push(times);
        sentOk.push(ok);
      }
      await sleep(graceMs);
      const fanoutPhasePct = ((cpuMs() - fc0) / (now() - ft0)) * 100;
      const collected = await agents.collect();

      const latency: number[] = [];
      const perSend: number[] = [];
      const lastArrival = new Array<number>(fanouts).fill(-Infinity);
      const seen = Array.from({ length: fanouts }, () => new Uint8Array(vmNames.length));
      const d = collected.data;
      for (let j = 0; j + 2 < d.length; j += 3) {
        const i = d[j] as number;
        const k = d[j + 1] as number;
        const at = d[j + 2] as number;
        const start = starts[k];
        const sent = sendTimes[k]?.[i];
        const seenK = seen[k];
        if (start === undefined || sent === undefined || !seenK || seenK[i]) continue;
        seenK[i] = 1;
        latency.push(at - start);
        perSend.push(at - sent);
        lastArrival[k] = Math.max(lastArrival[k] as number, at - start);
      }
      let missing = 0;
      for (let k = 0; k < fanouts; k++) {
        for (let i = 0; i < vmNames.length; i++) if (sentOk[k]?.[i] && !seen[k]?.[i]) missing++;
      }
      if (collected.unknown > 0) notes.push(`${collected.unknown} phase events arrived that this bench did not send`);
      const latencySummary = summarize(latency);
      const end = now();
      progress(`fan-out p50 ${round(latencySummary.p50, 2)} ms, p99 ${round(latencySummary.p99, 2)} ms, max ${round(latencySummary.max, 2)} ms`);

      return {
        sessions,
        sessionsAttached,
        sampleHz,
        fanouts,
        agentProcesses,
        latencyMs: roundSummary(latencySummary, 3),
        perSendLatencyMs: roundSummary(summarize(perSend), 3),
        sendLoopMs: roundSummary(summarize(loopMs), 3),
        flushMs: roundSummary(summarize(flushMs), 3),
        broadcastCompleteMs: roundSummary(summarize(lastArrival.filter(Number.isFinite)), 3),
        deliveries: { expected: fanouts * vmNames.length, arrived: latency.length, sendFailed, missing },
        cpu: {
          harnessIdlePct: round(harnessIdlePct, 2),
          coordinatorIdlePct: round(coordinatorIdlePct, 2),
          steadyPct: round(steadyPct, 2),
          steadyMs: round(steadyMs, 1),
          msPerSample: round(msPerSample, 4),
          msPerSampleNet: round(msPerSampleNet, 4),
          fanoutPhasePct: round(fanoutPhasePct, 2),
          agentsProcessPct: round(((a1 - a0) / wallMs) * 100, 1),
        },
        samples: { handled, perSecond: round(handled / (wallMs / 1000), 1), writeErrors },
        rssMiB: {
          harnessBaseline: round(harnessRss, 1),
          coordinatorIdle: round(coordinatorIdleRss, 1),
          steadyMax: round(rssMax, 1),
          end: round(rssMiB(), 1),
          agentsProcessMax: round(agentsRssMax, 1),
        },
        eventLoopDelayMs: { p50: round(eventLoopDelayMs.p50, 2), p99: round(eventLoopDelayMs.p99, 2), max: round(eventLoopDelayMs.max, 2) },
        clock: { offsetMs: round(clock.offsetMs, 3), rttMs: round(clock.rttMs, 3) },
        disconnects: hub.detachedCount - disconnectsBefore,
        seconds: round(wallMs / 1000, 2),
        timings: { attachMs: Math.round(attached.ms), totalMs: Math.round(end - started) },
        target: { p99FanoutMs: 50, met: latencySummary.count > 0 && latencySummary.p99 <= 50 && missing === 0 && sendFailed === 0 },
        notes,
      };
    } finally {
      clearInterval(rssPoll);
    }
  } finally {
    eld.disable();
    progress("stopping the simulated agents and the coordinator");
    await agents?.stop();
    await coordinator?.close();
    rmSync(work, { recursive: true, force: true });
  }
}
