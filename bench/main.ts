/**
 * `npm run bench`: the migration matrix on the real lab, plus the cost of the
 * agent and the coordinator. Prints markdown, writes JSON with every raw
 * number and an SVG chart under bench/results/.
 *
 *   npm run bench                         # full matrix, 3 repetitions, cost benches
 *   npm run bench -- --smoke              # CI: 1 repetition, workload b, plain vs Ballast
 *   npm run bench -- --reps 1 --workloads c,d --configs plain-precopy,ballast-inflate
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import si from "systeminformation";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { errorMessage } from "../shared/errors.js";
import { parseSize } from "../shared/units.js";
import { ensureGuestImage } from "../lab/guest-image.js";
import { ensureHostPackages } from "../lab/preflight.js";
import { Lab } from "../lab/lab.js";
import { runAgentCostGuest, runAgentCostHost, type AgentCostResult } from "./agent-cost.js";
import { runCoordinatorFanout, type FanoutResult } from "./coordinator-fanout.js";
import { CONFIGS, runMatrix, WORKLOADS, type RunResult, type Workload } from "./matrix.js";
import { bestStrategy, markdownTables, summarizeCells, svgChart, targetChecks } from "./report.js";

const USAGE = `usage: npm run bench -- [--reps N] [--bandwidth BYTES/S] [--workloads a,b,c,d]
                        [--configs id,...] [--no-cost] [--cost-only] [--sessions N] [--smoke] [--out DIR] [--from FILE.json]
configurations: ${CONFIGS.map((c) => c.id).join(", ")}`;

function log(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** The JSON file a run writes (and --from reads back). */
interface SavedRun {
  startedAt: string;
  bandwidth: number;
  reps: number;
  results: RunResult[];
  agentHost?: AgentCostResult;
  agentGuest?: AgentCostResult;
  fanout?: FanoutResult;
}

/** What the numbers were measured on: results from a 2-core TCG box and a KVM host do not compare. */
async function describeMachine(): Promise<{ summary: string; cpu: unknown; memTotalBytes: number; os: string; kvm: boolean }> {
  const [cpu, mem, os] = await Promise.all([si.cpu(), si.mem(), si.osInfo()]);
  let kvm = false;
  try {
    const { accessSync, constants } = await import("node:fs");
    accessSync("/dev/kvm", constants.R_OK | constants.W_OK);
    kvm = true;
  } catch {
    kvm = false;
  }
  const summary = `${cpu.manufacturer} ${cpu.brand}, ${cpu.cores} cores, ${(mem.total / 2 ** 30).toFixed(0)} GiB, ${os.distro} ${os.release}; QEMU under TCG (the lab never uses KVM)${kvm ? "; /dev/kvm present but unused" : ""}`;
  return { summary, cpu: { manufacturer: cpu.manufacturer, brand: cpu.brand, cores: cpu.cores, speed: cpu.speed }, memTotalBytes: mem.total, os: `${os.distro} ${os.release} ${os.kernel}`, kvm };
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      reps: { type: "string" },
      bandwidth: { type: "string" },
      workloads: { type: "string" },
      configs: { type: "string" },
      "no-cost": { type: "boolean" },
      "cost-only": { type: "boolean" },
      sessions: { type: "string" },
      smoke: { type: "boolean" },
      out: { type: "string" },
      from: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    log(USAGE);
    return 0;
  }
  const smoke = values.smoke === true;
  const reps = Number(values.reps ?? (smoke ? 1 : 3));
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`--reps: expected a positive integer, got ${values.reps}`);
  const bandwidth = values.bandwidth ? parseSize(values.bandwidth) : 125_000_000;
  const workloads = (values.workloads ?? (smoke ? "b" : "a,b,c,d")).split(",") as Workload["id"][];
  for (const w of workloads) if (!(w in WORKLOADS)) throw new Error(`--workloads: unknown workload ${JSON.stringify(w)} (a, b, c, d)`);
  const configs = (values.configs ?? (smoke ? "plain-precopy,ballast-inflate" : CONFIGS.map((c) => c.id).join(","))).split(",");
  for (const c of configs) if (!CONFIGS.some((x) => x.id === c)) throw new Error(`--configs: unknown configuration ${JSON.stringify(c)}\n${USAGE}`);
  const cost = !smoke && values["no-cost"] !== true;
  // The CI smoke run must not overwrite the published results.
  const outDir = resolve(values.out ?? (smoke ? "bench/results/smoke" : "bench/results"));
  mkdirSync(outDir, { recursive: true });

  const startedAt = new Date();
  const machine = await describeMachine();
  log(`# Ballast bench ${startedAt.toISOString()}`);
  log(`machine: ${machine.summary}`);
  log(`link cap ${bandwidth} B/s (${((bandwidth * 8) / 1e9).toFixed(2)} Gbit/s), ${reps} repetition(s), workloads ${workloads.join(",")}`);

  // --from re-reads an earlier run's raw results (e.g. to re-render, or to add
  // a fresh cost measurement with --cost-only) instead of migrating again.
  const prior = values.from ? (JSON.parse(readFileSync(values.from, "utf8")) as Partial<SavedRun>) : undefined;
  let results: RunResult[] = prior?.results ?? [];
  if (prior) log(`matrix results read from ${values.from} (${results.length} runs of ${prior.startedAt})`);
  else if (values["cost-only"] !== true) {
    log(`\n## Migration matrix\n`);
    await ensureHostPackages({ onProgress: (step) => log(`• ${step}`) });
    const image = await ensureGuestImage({ agentBundle: resolve("dist/ballast-agent.mjs"), onProgress: (step) => log(`• ${step}`) });
    results = await runMatrix({ reps, bandwidthBytesPerSec: bandwidth, workloads, configs, onProgress: log, image });
  }
  const cells = summarizeCells(results);

  let fanout: FanoutResult | undefined = prior?.fanout;
  let agentHost: AgentCostResult | undefined = prior?.agentHost;
  let agentGuest: AgentCostResult | undefined = prior?.agentGuest;
  if (cost && (!prior || values["cost-only"] === true)) {
    log("\n## Cost\n");
    agentHost = await runAgentCostHost({ seconds: 60 });
    log(`agent on the host: ${agentHost.cpuMsPerSample.toFixed(3)} ms CPU per sample, ${agentHost.rssMiB.toFixed(1)} MiB RSS`);
    const lab = await Lab.start({ memMiB: 1024 });
    try {
      agentGuest = await runAgentCostGuest(lab, { seconds: 60 });
      log(`agent in a TCG guest: ${agentGuest.cpuMsPerSample.toFixed(3)} ms CPU per sample, ${agentGuest.rssMiB.toFixed(1)} MiB RSS`);
    } finally {
      await lab.stop();
    }
    fanout = await runCoordinatorFanout({ sessions: Number(values.sessions ?? 500), onProgress: log });
    log(`coordinator, ${fanout.sessionsAttached} sessions at ${fanout.sampleHz} Hz: fan-out p50 ${fanout.latencyMs.p50.toFixed(1)} ms, p99 ${fanout.latencyMs.p99.toFixed(1)} ms; CPU ${fanout.cpu.steadyPct.toFixed(1)} %`);
  }

  const best = bestStrategy(cells);
  const checks = best ? targetChecks(cells, best) : [];
  const matrixAt = prior?.startedAt ?? startedAt.toISOString();
  const md: string[] = [`# Ballast bench, ${matrixAt}`, "", `Machine: ${machine.summary}.`, ""];
  if (results.length > 0) {
    md.push(`Link cap ${prior?.bandwidth ?? bandwidth} B/s; ${prior?.reps ?? reps} repetition(s); medians with [min–max]; ratios against the baseline measured in this run (plain pre-copy, or plain post-copy for post-copy modes).`, "");
    md.push(markdownTables(cells));
    const failed = results.filter((r) => !r.ok);
    if (failed.length > 0) md.push(`Failed runs: ${failed.map((r) => `(${r.workload}) ${r.config} rep ${r.rep}: ${r.error}`).join("; ")}`, "");
    if (best) md.push(`Default strategy: **${best}**, the fastest Ballast pre-copy strategy on (c) among those with no failed run.`, "");
    if (checks.length > 0) {
      md.push("| target | measured | met |", "|---|---|---|");
      for (const c of checks) md.push(`| ${c.target} | ${c.measured} | ${c.met === undefined ? "not measured" : c.met ? "yes" : "**no**"} |`);
      md.push("");
    }
  }
  if (agentHost || agentGuest || fanout) {
    md.push("| cost | measured | target |", "|---|---|---|");
    if (agentHost) md.push(`| agent on the host: CPU per sample, RSS | ${agentHost.cpuMsPerSample.toFixed(3)} ms, ${agentHost.rssMiB.toFixed(1)} MiB | ≤ 1 ms, ≤ 60 MiB |`);
    if (agentGuest) md.push(`| agent in a TCG guest: CPU per sample, RSS | ${agentGuest.cpuMsPerSample.toFixed(3)} ms, ${agentGuest.rssMiB.toFixed(1)} MiB | ≤ 1 ms, ≤ 60 MiB |`);
    if (fanout) {
      md.push(`| coordinator, ${fanout.sessionsAttached} sessions: fan-out p50 / p99 / max | ${fanout.latencyMs.p50.toFixed(1)} / ${fanout.latencyMs.p99.toFixed(1)} / ${fanout.latencyMs.max.toFixed(1)} ms | p99 ≤ 50 ms |`);
      md.push(`| coordinator CPU at ${fanout.sampleHz} Hz sampling, per sample | ${fanout.cpu.steadyPct.toFixed(1)} % of a core, ${fanout.cpu.msPerSample.toFixed(3)} ms | – |`);
      md.push(`| coordinator deliveries | ${fanout.deliveries.arrived}/${fanout.deliveries.expected} | all |`);
    }
    md.push("");
  }
  const text = md.join("\n");
  log(`\n${text}`);

  const stamp = startedAt.toISOString().replace(/[:.]/g, "-");
  const json = JSON.stringify({ startedAt: matrixAt, costAt: startedAt, machine, bandwidth, reps, workloads, configs, results, cells, best, checks, agentHost, agentGuest, fanout }, null, 2);
  const files: [string, string][] = [
    [`bench-${stamp}.json`, json],
    ["latest.json", json],
    ["latest.md", text],
  ];
  if (results.length > 0) files.push(["latest.svg", svgChart(cells)]);
  for (const [name, body] of files) writeFileSync(join(outDir, name), body);
  log(`results: ${files.map(([n]) => join(outDir, n)).join(", ")}`);
  return results.some((r) => !r.ok) ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`bench failed: ${errorMessage(err)}\n`);
    process.exit(1);
  },
);
