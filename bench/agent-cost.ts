/**
 * What the guest agent costs: CPU time per sample and resident memory of the
 * REAL agent bundle (dist/ballast-agent.mjs), on this host and inside a lab
 * guest.
 *
 * CPU comes from the kernel's per-process accounting, read from /proc:
 *  - /proc/<pid>/task/<tid>/schedstat, first field, summed over threads:
 *    nanoseconds on CPU (the primary figure when the kernel exposes it);
 *  - /proc/<pid>/stat utime+stime: all threads, in clock ticks of 10 ms
 *    (USER_HZ is 100 on Linux/x86), reported next to it as a cross-check.
 * The CPU window runs from one sample's arrival at the coordinator to a later
 * sample's arrival, so it spans whole sampling periods: start-up (module
 * load, first attach) is outside it. The cost per sample therefore includes
 * everything the agent does per period: the /proc reads, the policy, the
 * gRPC writes, timers, keepalive pings and GC. "Per sample" means per
 * sampling period (window length × rate): the agent takes and decides on a
 * sample every period but reports only some of them to the coordinator
 * (`reportedSamples`), so counting arrivals would overstate the cost.
 *
 * RSS is VmRSS from /proc/<pid>/status, polled during the window (max), with
 * VmHWM (the peak since the process started, start-up included) alongside.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { AgentService } from "../gen/ballast/v1/agent_pb.js";
import { SERVER_OPTIONS } from "../coordinator/server.js";
import { addService } from "../shared/grpc-adapter.js";
import type { Lab } from "../lab/lab.js";
import { round } from "./stats.js";
import { sleep } from "../shared/retry.js";

const ROOT = resolve(import.meta.dirname, "..");
const KiB = 1024;
const MiB = 1024 * KiB;
/** USER_HZ: /proc/<pid>/stat times are in 1/100 s on Linux x86 (fixed by the ABI, whatever CONFIG_HZ is). */
export const CLOCK_TICKS_PER_SEC = 100;

/** The agent's NODE_OPTIONS in production (agent/ballast-agent.service) and in the lab guest. */
export const PRODUCTION_NODE_OPTIONS = "--max-old-space-size=64";

/** The V8 flags on the agent's command line in production (ExecStart in agent/ballast-agent.service, and lab/guest/agent-supervisor.sh). */
export const PRODUCTION_NODE_ARGS: readonly string[] = ["--lite-mode", "--max-semi-space-size=1"];

/** Targets from the issue. */
export const AGENT_COST_TARGETS = Object.freeze({ cpuMsPerSample: 1, rssMiB: 60 });

/** What one agent-cost run measured. */
export interface AgentCostResult {
  where: "host" | "guest";
  /** CPU time of the agent process per sample (ms), from {@link AgentCostResult.cpuSource}. */
  cpuMsPerSample: number;
  /** Max VmRSS polled during the window, MiB. */
  rssMiB: number;
  /** Sampling periods in the CPU window (window × rate): the agent takes one sample per period. */
  samples: number;
  /** Samples the coordinator received in the window (the agent reports only some of those it takes). */
  reportedSamples: number;
  /** Length of the CPU window, seconds. */
  seconds: number;
  /** The sampling rate the agent ran at. */
  hz: number;
  /** CPU time in the window, ms. */
  cpuMs: number;
  /** "schedstat": ns-precise sum over threads; "stat": utime+stime ticks (10 ms resolution). */
  cpuSource: "schedstat" | "stat";
  /** The same from utime+stime ticks, for comparison (10 ms resolution: coarse over short windows). */
  cpuMsPerSampleFromTicks: number;
  /** VmHWM at the end: peak RSS since the agent started (start-up included), MiB. */
  rssHwmMiB: number;
  /** How many RSS readings the max is over. */
  rssPolls: number;
  /** How the window was aligned: on samples the coordinator received, or (estimated) not aligned. */
  samplesSource: "coordinator" | "estimated";
  /** Balloon requests the agent sent during the window (0 unless steady-state ballooning shrinks). */
  balloonRequests?: number;
  /** The agent's pid (in the guest's pid namespace for "guest"). */
  pid: number;
  target: { cpuMsPerSample: number; rssMiB: number; met: boolean };
  notes: string[];
}

/** utime, stime and start time of a process, in clock ticks, from /proc/<pid>/stat. */
export interface ProcStat {
  comm: string;
  state: string;
  utimeTicks: number;
  stimeTicks: number;
  startTimeTicks: number;
}

/**
 * Parses /proc/<pid>/stat. The command name sits in parentheses and may hold
 * spaces or parentheses itself, so fields are counted from the LAST ")".
 * @throws Error when the text is not a stat line
 */
export function parseProcStat(text: string): ProcStat {
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) throw new Error(`not a /proc/<pid>/stat line: ${JSON.stringify(text.slice(0, 80))}`);
  // After ") " come fields 3 (state), 4 (ppid), …: field n is at index n - 3.
  const f = text.slice(close + 2).trim().split(/\s+/);
  const num = (field: number, name: string) => {
    const v = Number(f[field - 3]);
    if (!Number.isInteger(v) || v < 0) throw new Error(`/proc/<pid>/stat: field ${field} (${name}) is ${JSON.stringify(f[field - 3])}`);
    return v;
  };
  return {
    comm: text.slice(open + 1, close),
    state: f[0] ?? "",
    utimeTicks: num(14, "utime"),
    stimeTicks: num(15, "stime"),
    startTimeTicks: num(22, "starttime"),
  };
}

/**
 * Sums the first field (ns on CPU) of one or more schedstat lines
 * ("run_ns wait_ns timeslices", one per thread). Returns undefined when no
 * line parses (kernel without schedstat).
 */
export function sumSchedstatNs(text: string): number | undefined {
  let sum = 0;
  let any = false;
  for (const line of text.split("\n")) {
    const m = /^\s*(\d+)\s+\d+\s+\d+\s*$/.exec(line);
    if (!m) continue;
    sum += Number(m[1]);
    any = true;
  }
  return any ? sum : undefined;
}

/** A "Name:  1234 kB" field of /proc/<pid>/status in bytes, or undefined. */
export function statusBytes(text: string, field: string): number | undefined {
  const m = new RegExp(`^${field}:\\s+(\\d+)\\s+kB\\s*$`, "m").exec(text);
  return m ? Number(m[1]) * KiB : undefined;
}

interface CpuSnapshot {
  at: number;
  samples: number;
  ticks: number;
  schedNs: number | undefined;
}

const now = () => performance.timeOrigin + performance.now();

function cpuFrom(start: CpuSnapshot, end: CpuSnapshot, notes: string[]): { cpuMs: number; source: "schedstat" | "stat"; ticksMs: number } {
  const ticksMs = ((end.ticks - start.ticks) * 1000) / CLOCK_TICKS_PER_SEC;
  if (start.schedNs !== undefined && end.schedNs !== undefined && end.schedNs >= start.schedNs) {
    return { cpuMs: (end.schedNs - start.schedNs) / 1e6, source: "schedstat", ticksMs };
  }
  notes.push("per-thread schedstat unavailable: CPU from utime+stime ticks (10 ms resolution)");
  return { cpuMs: ticksMs, source: "stat", ticksMs };
}

function finish(
  where: "host" | "guest",
  pid: number,
  hz: number,
  start: CpuSnapshot,
  end: CpuSnapshot,
  rss: { maxBytes: number; polls: number; hwmBytes: number },
  samplesSource: "coordinator" | "estimated",
  notes: string[],
  balloonRequests?: number,
): AgentCostResult {
  const reportedSamples = end.samples - start.samples;
  const samples = Math.round(((end.at - start.at) / 1000) * hz);
  const cpu = cpuFrom(start, end, notes);
  const cpuMsPerSample = samples > 0 ? cpu.cpuMs / samples : NaN;
  const rssMiB = rss.maxBytes / MiB;
  const out: AgentCostResult = {
    where,
    cpuMsPerSample: round(cpuMsPerSample, 4),
    rssMiB: round(rssMiB, 1),
    samples,
    reportedSamples,
    seconds: round((end.at - start.at) / 1000, 2),
    hz,
    cpuMs: round(cpu.cpuMs, 2),
    cpuSource: cpu.source,
    cpuMsPerSampleFromTicks: round(samples > 0 ? cpu.ticksMs / samples : NaN, 3),
    rssHwmMiB: round(rss.hwmBytes / MiB, 1),
    rssPolls: rss.polls,
    samplesSource,
    pid,
    target: {
      ...AGENT_COST_TARGETS,
      met: samples > 0 && cpuMsPerSample <= AGENT_COST_TARGETS.cpuMsPerSample && rssMiB <= AGENT_COST_TARGETS.rssMiB,
    },
    notes,
  };
  if (balloonRequests !== undefined) out.balloonRequests = balloonRequests;
  return out;
}

/** Options of {@link runAgentCostHost}. */
export interface AgentCostHostOptions {
  /** Length of the measured window. Default 60. */
  seconds?: number;
  /** Sampling rate pushed to the agent in Policy. Default 1 (sample_interval 1000 ms). */
  hz?: number;
  /** Samples before the window starts (start-up stays out of it). Default 3. */
  warmupSamples?: number;
  /** Policy.steady_state for the agent. Default false (the lab's default too, so host and guest compare). */
  steadyState?: boolean;
  /** NODE_OPTIONS for the agent. Default "--max-old-space-size=64", as agent/ballast-agent.service sets. */
  nodeOptions?: string;
  /** Node flags before the bundle. Default {@link PRODUCTION_NODE_ARGS}, as in production. */
  nodeArgs?: string[];
  /** The agent bundle to run. Default dist/ballast-agent.mjs (for investigation: a variant build elsewhere). */
  bundle?: string;
  onProgress?: (line: string) => void;
}

function readHostSnapshot(pid: number, samples: number): CpuSnapshot {
  const at = now();
  const stat = parseProcStat(readFileSync(`/proc/${pid}/stat`, "utf8"));
  let schedNs: number | undefined = 0;
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      let text: string;
      try {
        text = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8");
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT" && schedNs !== undefined) continue; // thread gone meanwhile
        throw err;
      }
      const ns = sumSchedstatNs(text);
      if (ns === undefined) {
        schedNs = undefined;
        break;
      }
      schedNs += ns;
    }
  } catch {
    schedNs = undefined;
  }
  return { at, samples, ticks: stat.utimeTicks + stat.stimeTicks, schedNs };
}

/**
 * Runs the real agent bundle on this host against an in-process fake
 * coordinator on 127.0.0.1 (Policy sample_interval = 1000/hz ms), reading
 * the host's real /proc. Stops the agent and the server before resolving.
 */
export async function runAgentCostHost(opts: AgentCostHostOptions = {}): Promise<AgentCostResult> {
  const seconds = opts.seconds ?? 60;
  const hz = opts.hz ?? 1;
  const warmupSamples = opts.warmupSamples ?? 3;
  const progress = opts.onProgress ?? (() => {});
  if (!(seconds > 0 && seconds <= 3600)) throw new RangeError(`seconds must be in (0, 3600], got ${seconds}`);
  if (!(hz > 0 && hz <= 10)) throw new RangeError(`hz must be in (0, 10], got ${hz}`);
  const intervalMs = Math.round(1000 / hz);
  const nodeOptions = opts.nodeOptions ?? PRODUCTION_NODE_OPTIONS;
  const bundle = opts.bundle ?? join(ROOT, "dist/ballast-agent.mjs");
  const ramBytes = statusBytes(readFileSync("/proc/meminfo", "utf8"), "MemTotal") ?? 1024 * MiB;
  const notes: string[] = [
    `real agent bundle on this host, NODE_OPTIONS=${JSON.stringify(nodeOptions)}${nodeOptions === PRODUCTION_NODE_OPTIONS ? " as in agent/ballast-agent.service" : ""}; Policy sample_interval ${intervalMs} ms, steady_state ${opts.steadyState ?? false}`,
    "CPU window aligned on samples the fake coordinator received: it spans whole sampling periods (agent start-up excluded); per sample = per sampling period",
  ];

  let samples = 0;
  let balloonRequests = 0;
  let onSample: (() => void) | undefined;
  const server = new grpc.Server(SERVER_OPTIONS);
  addService(
    server,
    AgentService,
    {
      session: async (ctx) => {
        for await (const req of ctx) {
          switch (req.msg.case) {
            case "hello":
              await ctx.send({ msg: { case: "welcome", value: { vmName: "bench-host", hostId: "bench-fake-coordinator" } } });
              await ctx.send({
                msg: {
                  case: "policy",
                  value: { floorBytes: BigInt(256 * MiB), maxBytes: BigInt(ramBytes), sampleIntervalMs: intervalMs, steadyState: opts.steadyState ?? false },
                },
              });
              await ctx.send({ msg: { case: "balloonState", value: { targetBytes: BigInt(ramBytes), actualBytes: BigInt(ramBytes), ramBytes: BigInt(ramBytes) } } });
              break;
            case "sample":
              samples++;
              onSample?.();
              break;
            case "balloonRequest":
              balloonRequests++;
              break;
            default:
              break;
          }
        }
      },
    },
    (err) => ({ code: grpc.status.INTERNAL, details: err instanceof Error ? err.message : String(err) }),
  );
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, p) => (err ? rej(err) : res(p))),
  );

  const work = mkdtempSync(join(tmpdir(), "ballast-agent-cost-"));
  // An empty config file: a host-wide /etc/ballast/agent.json must not change what is measured.
  const configFile = join(work, "agent.json");
  writeFileSync(configFile, "{}\n");
  progress(`starting ${bundle} against a fake coordinator on 127.0.0.1:${port}`);
  const child = spawn(
    process.execPath,
    [...(opts.nodeArgs ?? PRODUCTION_NODE_ARGS), bundle, "run", "--config", configFile, "--coordinator", `127.0.0.1:${port}`, "--vm-id", "bench-host", "--no-drop-caches", "--sample-interval-ms", String(intervalMs)],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NODE_OPTIONS: nodeOptions, LOG_LEVEL: "info" } },
  );
  let output = "";
  const keep = (b: Buffer) => {
    output = (output + b.toString()).slice(-4000);
  };
  child.stdout.on("data", keep);
  child.stderr.on("data", keep);
  let exitInfo: string | undefined;
  const exited = new Promise<void>((r) =>
    child.once("exit", (code, signal) => {
      exitInfo = `exit ${code ?? signal}`;
      r();
    }),
  );
  const pid = child.pid;
  let rssTimer: NodeJS.Timeout | undefined;
  try {
    if (pid === undefined) throw new Error("agent-cost: the agent did not start");
    // Resolves with a snapshot taken inside the coordinator's handler, right as sample `n` arrives.
    const snapshotAtSample = (n: number, timeoutMs: number, what: string) =>
      new Promise<CpuSnapshot>((res, rej) => {
        let settled = false;
        const settle = (fn: () => void) => {
          if (settled) return;
          settled = true;
          onSample = undefined;
          clearTimeout(t);
          fn();
        };
        const fail = (why: string) =>
          settle(() => rej(new Error(`agent-cost: no ${what}: ${why} (${samples} samples so far); agent output: ${output.slice(-1500)}`)));
        const t = setTimeout(() => fail(`not within ${timeoutMs} ms`), timeoutMs);
        void exited.then(() => fail(`the agent ended (${exitInfo})`));
        onSample = () => {
          if (samples < n) return;
          settle(() => {
            try {
              res(readHostSnapshot(pid, samples));
            } catch (err) {
              rej(err as Error);
            }
          });
        };
      });

    const start = await snapshotAtSample(warmupSamples, 30_000 + warmupSamples * intervalMs * 2, `warm-up sample #${warmupSamples}`);
    const balloonAtStart = balloonRequests;
    progress(`measuring for ${seconds} s at ${hz} Hz (pid ${pid})`);
    let rssMax = 0;
    let polls = 0;
    const pollRss = () => {
      try {
        const b = statusBytes(readFileSync(`/proc/${pid}/status`, "utf8"), "VmRSS");
        if (b !== undefined) {
          rssMax = Math.max(rssMax, b);
          polls++;
        }
      } catch {
        // The process ended; the sample wait below reports it.
      }
    };
    pollRss();
    rssTimer = setInterval(pollRss, 1000);
    await sleep(seconds * 1000);
    const end = await snapshotAtSample(samples + 1, 10_000 + intervalMs * 3, "sample to close the window");
    clearInterval(rssTimer);
    pollRss();
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const hwm = statusBytes(status, "VmHWM") ?? NaN;
    const result = finish("host", pid, hz, start, end, { maxBytes: rssMax, polls, hwmBytes: hwm }, "coordinator", notes, balloonRequests - balloonAtStart);
    progress(`agent on host: ${result.cpuMsPerSample} ms CPU per sample over ${result.samples} samples (${result.reportedSamples} reported), RSS max ${result.rssMiB} MiB`);
    return result;
  } finally {
    if (rssTimer) clearInterval(rssTimer);
    onSample = undefined;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const kill = setTimeout(() => child.kill("SIGKILL"), 5_000);
      await exited;
      clearTimeout(kill);
    }
    server.forceShutdown();
    rmSync(work, { recursive: true, force: true });
  }
}

/** Options of {@link runAgentCostGuest}. */
export interface AgentCostGuestOptions {
  /** Length of the measured window. Default 60. */
  seconds?: number;
  /** The agent's sampling rate, for the elapsed × rate fallback only. Default 1 (the lab's 1000 ms). */
  hz?: number;
  /** How often guest RSS is read through the serial shell. Default 5000 ms. */
  rssEveryMs?: number;
  /** Samples the coordinator must see before the window starts (the agent may have just attached). Default 3. */
  warmupSamples?: number;
  onProgress?: (line: string) => void;
}

const SECTION = "@@BALLAST_BENCH@@";

/** The shell command that prints stat, every thread's schedstat and VmRSS/VmHWM of `pid`, in sections. */
export function guestSnapshotCommand(pid: number): string {
  const p = `/proc/${pid}`;
  return `cat ${p}/stat; echo ${SECTION}; cat ${p}/task/*/schedstat 2>/dev/null; echo ${SECTION}; grep -E '^(VmRSS|VmHWM):' ${p}/status`;
}

/** Parses the output of {@link guestSnapshotCommand}. */
export function parseGuestSnapshot(output: string): { stat: ProcStat; schedNs: number | undefined; rssBytes: number | undefined; hwmBytes: number | undefined } {
  const [statText = "", schedText = "", statusText = ""] = output.split(`${SECTION}\n`);
  return {
    stat: parseProcStat(statText.trim()),
    schedNs: sumSchedstatNs(schedText),
    rssBytes: statusBytes(statusText, "VmRSS"),
    hwmBytes: statusBytes(statusText, "VmHWM"),
  };
}

/** The shell command that prints the pid of every node process running the agent bundle with `run`. */
export const GUEST_FIND_AGENT_COMMAND =
  "for p in $(pidof node 2>/dev/null); do if tr '\\0' ' ' </proc/$p/cmdline 2>/dev/null | grep -q 'ballast-agent[^ ]* run'; then echo $p; fi; done; true";

/**
 * Measures the agent already running inside a lab guest: its pid from the
 * guest's /proc (via the serial shell), /proc/<pid>/stat, per-thread
 * schedstat and status at the start and end of the window, and the samples
 * the active host's coordinator received (distinct last_sample timestamps,
 * polled every 200 ms over VmService.GetVm); if that polling fails, samples
 * are estimated from elapsed time × rate and `samplesSource` says so.
 *
 * Under TCG (no KVM) guest CPU time is emulated: the numbers are inflated
 * against a KVM guest and say more about the emulator than the agent.
 */
export async function runAgentCostGuest(lab: Lab, opts: AgentCostGuestOptions = {}): Promise<AgentCostResult> {
  const seconds = opts.seconds ?? 60;
  const hz = opts.hz ?? 1;
  const rssEveryMs = opts.rssEveryMs ?? 5_000;
  const progress = opts.onProgress ?? (() => {});
  if (!(seconds > 0 && seconds <= 3600)) throw new RangeError(`seconds must be in (0, 3600], got ${seconds}`);
  const notes: string[] = [
    "the agent inside the lab guest (QEMU TCG unless the lab uses KVM: guest CPU time is emulated and inflated)",
    `CPU window aligned on samples seen by the coordinator; guest /proc read through the serial shell (USER_HZ ${CLOCK_TICKS_PER_SEC} assumed)`,
  ];

  const cpu = await lab.shell.run("grep -m1 'model name' /proc/cpuinfo", { timeoutMs: 30_000 }).catch(() => undefined);
  const model = cpu?.output.replace(/^model name\s*:\s*/, "").trim() ?? "";
  if (model) notes.push(`guest CPU: ${model}${/TCG/.test(model) ? " (TCG: emulated, CPU times inflated)" : ""}`);

  const found = await lab.shell.run(GUEST_FIND_AGENT_COMMAND, { timeoutMs: 30_000 });
  const pids = found.output
    .split(/\s+/)
    .filter((s) => /^\d+$/.test(s))
    .map(Number);
  const pid = pids[0];
  if (pid === undefined) throw new Error(`agent-cost: no ballast-agent process in the guest (pidof/cmdline gave ${JSON.stringify(found.output.trim())})`);
  if (pids.length > 1) notes.push(`several agent processes in the guest (${pids.join(", ")}); measured ${pid}`);
  progress(`guest agent pid ${pid}`);

  // Sample counter from the coordinator side.
  let count = 0;
  let lastTs: bigint | undefined;
  let pollErrors = 0;
  let polls = 0;
  let stopPoll = false;
  let changed: (() => void) | undefined;
  const poller = (async () => {
    while (!stopPoll) {
      try {
        const vm = await lab.vm();
        polls++;
        const ts = vm.lastSample?.timestampMs;
        if (ts !== undefined && ts !== lastTs) {
          if (lastTs !== undefined) count++;
          lastTs = ts;
          changed?.();
        }
      } catch {
        pollErrors++;
      }
      await sleep(200);
    }
  })();
  const nextSampleSeen = (timeoutMs: number) =>
    new Promise<boolean>((res) => {
      const t = setTimeout(() => {
        changed = undefined;
        res(false);
      }, timeoutMs);
      changed = () => {
        changed = undefined;
        clearTimeout(t);
        res(true);
      };
    });

  const snapshot = async (): Promise<{ snap: CpuSnapshot; parsed: ReturnType<typeof parseGuestSnapshot> }> => {
    const samplesBefore = count;
    const at = now();
    const res = await lab.shell.run(guestSnapshotCommand(pid), { timeoutMs: 60_000 });
    const parsed = parseGuestSnapshot(res.output);
    if (count !== samplesBefore) notes.push("a sample arrived while the guest /proc was being read: the sample count may be off by one");
    return { snap: { at, samples: samplesBefore, ticks: parsed.stat.utimeTicks + parsed.stat.stimeTicks, schedNs: parsed.schedNs }, parsed };
  };

  try {
    const warmup = opts.warmupSamples ?? 3;
    for (let i = 1; i < warmup; i++) await nextSampleSeen(10_000);
    // Read right after a sample landed, so the read falls between two ticks.
    const aligned = await nextSampleSeen(10_000);
    const first = await snapshot();
    let rssMax = first.parsed.rssBytes ?? 0;
    let rssPolls = first.parsed.rssBytes === undefined ? 0 : 1;
    progress(`measuring the guest agent for ${seconds} s`);
    const until = now() + seconds * 1000;
    while (now() < until) {
      await sleep(Math.min(rssEveryMs, Math.max(0, until - now())));
      if (now() >= until) break;
      try {
        const r = await lab.shell.run(`grep -E '^VmRSS:' /proc/${pid}/status`, { timeoutMs: 30_000 });
        const b = statusBytes(r.output, "VmRSS");
        if (b !== undefined) {
          rssMax = Math.max(rssMax, b);
          rssPolls++;
        }
      } catch {
        // A missed RSS reading only narrows the max.
      }
    }
    const alignedEnd = await nextSampleSeen(10_000);
    const last = await snapshot();
    if (last.parsed.stat.startTimeTicks !== first.parsed.stat.startTimeTicks) {
      throw new Error(`agent-cost: the guest agent (pid ${pid}) restarted during the window; no valid measurement`);
    }
    if (last.parsed.rssBytes !== undefined) {
      rssMax = Math.max(rssMax, last.parsed.rssBytes);
      rssPolls++;
    }
    let samplesSource: "coordinator" | "estimated" = "coordinator";
    let start = first.snap;
    let end = last.snap;
    if (!aligned || !alignedEnd || polls === 0 || end.samples <= start.samples) {
      samplesSource = "estimated";
      const est = Math.round(((end.at - start.at) / 1000) * hz);
      start = { ...start, samples: 0 };
      end = { ...end, samples: est };
      notes.push(`samples estimated as elapsed × ${hz} Hz: the coordinator poll did not see samples (${polls} polls, ${pollErrors} errors)`);
    }
    const result = finish(
      "guest",
      pid,
      hz,
      start,
      end,
      { maxBytes: rssMax, polls: rssPolls, hwmBytes: last.parsed.hwmBytes ?? NaN },
      samplesSource,
      notes,
    );
    progress(`agent in guest: ${result.cpuMsPerSample} ms CPU per sample over ${result.samples} samples, RSS max ${result.rssMiB} MiB`);
    return result;
  } finally {
    stopPoll = true;
    changed = undefined;
    await poller;
  }
}
