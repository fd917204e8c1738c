/**
 * The migration matrix: workloads × configurations × repetitions, each run
 * on a freshly booted lab guest so every configuration starts from the same
 * guest state. Every number comes from the run itself (QEMU's query-migrate
 * on both sides, the guest's /proc, the coordinator's record).
 */
import { readFileSync } from "node:fs";
import { BalloonStrategy, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import type { Migration } from "../gen/ballast/v1/migration_pb.js";
import { errorMessage } from "../shared/errors.js";
import { MiB } from "../shared/units.js";
import type { GuestImage } from "../lab/guest-image.js";
import { Lab } from "../lab/lab.js";
import {
  cacheRead,
  freedAnon,
  guestClockOffsetMs,
  guestMeminfo,
  guestVmstat,
  hotWriterProgress,
  rateBetween,
  startBurst,
  startHotWriter,
} from "../lab/workloads.js";

/** A guest workload, set up before the migration. */
export interface Workload {
  id: "a" | "b" | "c" | "d";
  label: string;
  /** Whether a hot writer runs during the migration (its rate is reported). */
  writer: boolean;
  /** Whether a 300 MiB burst fires right after switchover (post-copy) or completion. */
  burst: boolean;
  setup(lab: Lab): Promise<void>;
}

/** How a migration is done. */
export interface BenchConfig {
  id: string;
  label: string;
  mode: MigrationMode;
  strategy: BalloonStrategy;
  freePageReporting: boolean;
  /** Agents self-balloon continuously (the DSB idea); the run waits for the balloon to settle first. */
  steadyState: boolean;
  /** Drop clean cache in the guest and give free-page reporting 3 s, counted as PREPARE time. */
  dropCacheFirst?: boolean;
  /** Workloads this configuration is meant for. */
  workloads: Workload["id"][];
}

/** Everything measured in one run. */
export interface RunResult {
  workload: Workload["id"];
  config: string;
  rep: number;
  ok: boolean;
  error: string;
  transferredBytes: number;
  normalPages: number;
  duplicatePages: number;
  /** PREPARE (inflation, or the cache drop + reporting wait) plus migrate, by coordinator clock. */
  totalMs: number;
  prepareMs: number;
  migrateMs: number;
  qemuTotalTimeMs: number;
  downtimeMs: number;
  passes: number;
  postcopyRequests: number;
  blocktimeMs: number;
  oomKills: number;
  /** Balloon work done before the request (steady state settling), not part of totalMs. */
  preworkMs: number;
  writerRateBeforeMiBs: number;
  writerRateDuringMiBs: number;
  /** Memory the guest keeps (balloon actual) minus MemAvailable at migration time: what one copy of the guest needs. */
  workingSetBytes: number;
  balloonMinBytes: number;
}

const writerOpts = { mib: 150, rateMiB: 32 };

/** The workloads of the issue: (a) idle, (b) freed anon, (c) cache heavy, (d) post-copy burst. */
export const WORKLOADS: Record<Workload["id"], Workload> = {
  a: { id: "a", label: "idle", writer: false, burst: false, setup: async () => {} },
  b: { id: "b", label: "freed anon (600 MiB written, freed)", writer: false, burst: false, setup: async (lab) => freedAnon(lab.shell, 600) },
  c: {
    id: "c",
    label: "cache heavy (500 MiB clean cache + 150 MiB hot anon at 32 MiB/s)",
    writer: true,
    burst: false,
    setup: async (lab) => {
      await cacheRead(lab.shell, 500);
      await startHotWriter(lab.shell, writerOpts);
    },
  },
  d: {
    id: "d",
    label: "post-copy burst (writer during, 300 MiB allocated after switchover)",
    writer: true,
    burst: true,
    setup: async (lab) => {
      await cacheRead(lab.shell, 300);
      await startHotWriter(lab.shell, writerOpts);
      await startBurst(lab.shell, { mib: 300, triggerFile: "/tmp/burst.go", outFile: "/tmp/burst.out" });
    },
  },
};

const PRE: Workload["id"][] = ["a", "b", "c"];
const POST: Workload["id"][] = ["c", "d"];

/** The configurations compared. */
export const CONFIGS: BenchConfig[] = [
  { id: "plain-precopy", label: "plain pre-copy", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.NONE, freePageReporting: false, steadyState: false, workloads: PRE },
  { id: "fpr-precopy", label: "pre-copy + free-page reporting", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.NONE, freePageReporting: true, steadyState: false, workloads: PRE },
  {
    id: "dropcache-fpr",
    label: "cache drop + free-page reporting",
    mode: MigrationMode.PRECOPY,
    strategy: BalloonStrategy.NONE,
    freePageReporting: true,
    steadyState: false,
    dropCacheFirst: true,
    workloads: PRE,
  },
  { id: "ballast-inflate", label: "Ballast pre-copy, inflate then migrate", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.INFLATE_THEN_MIGRATE, freePageReporting: false, steadyState: false, workloads: PRE },
  { id: "ballast-overlap", label: "Ballast pre-copy, inflate overlapping", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.OVERLAP, freePageReporting: false, steadyState: false, workloads: PRE },
  { id: "ballast-steady", label: "Ballast pre-copy, steady-state self-balloon", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.STEADY_STATE, freePageReporting: false, steadyState: true, workloads: PRE },
  { id: "ballast-fpr", label: "Ballast pre-copy + free-page reporting", mode: MigrationMode.PRECOPY, strategy: BalloonStrategy.INFLATE_THEN_MIGRATE, freePageReporting: true, steadyState: false, workloads: PRE },
  { id: "plain-postcopy", label: "plain post-copy", mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.NONE, freePageReporting: false, steadyState: false, workloads: POST },
  { id: "ballast-postcopy", label: "Ballast post-copy", mode: MigrationMode.POSTCOPY, strategy: BalloonStrategy.INFLATE_THEN_MIGRATE, freePageReporting: false, steadyState: false, workloads: POST },
  { id: "ballast-hybrid", label: "Ballast hybrid (1 pass, then post-copy)", mode: MigrationMode.HYBRID, strategy: BalloonStrategy.INFLATE_THEN_MIGRATE, freePageReporting: false, steadyState: false, workloads: POST },
];

/** Options for {@link runMatrix}. */
export interface MatrixOptions {
  reps: number;
  bandwidthBytesPerSec: number;
  workloads: Workload["id"][];
  configs: string[];
  /** One line per finished run, and steps within a run. */
  onProgress?: (line: string) => void;
  /** The guest image every run boots; built once so all runs use the same agent. */
  image?: GuestImage;
}

async function settleBalloon(lab: Lab, maxMs: number): Promise<number> {
  const started = Date.now();
  let last = -1;
  let stableSince = Date.now();
  while (Date.now() - started < maxMs) {
    const vm = await lab.vm();
    const actual = Number(vm.balloon?.actualBytes ?? 0n);
    if (Math.abs(actual - last) > 8 * MiB) {
      last = actual;
      stableSince = Date.now();
    } else if (Date.now() - stableSince >= 8000) break;
    await new Promise((r) => setTimeout(r, 500));
  }
  return Date.now() - started;
}

/** One run: boot, set up, migrate once, measure. */
export async function runOnce(w: Workload, c: BenchConfig, rep: number, o: MatrixOptions): Promise<RunResult> {
  const res: RunResult = {
    workload: w.id,
    config: c.id,
    rep,
    ok: false,
    error: "",
    transferredBytes: 0,
    normalPages: 0,
    duplicatePages: 0,
    totalMs: 0,
    prepareMs: 0,
    migrateMs: 0,
    qemuTotalTimeMs: 0,
    downtimeMs: 0,
    passes: 0,
    postcopyRequests: 0,
    blocktimeMs: 0,
    oomKills: 0,
    preworkMs: 0,
    writerRateBeforeMiBs: 0,
    writerRateDuringMiBs: 0,
    workingSetBytes: 0,
    balloonMinBytes: 0,
  };
  const lab = await Lab.start({ memMiB: 1024, freePageReporting: c.freePageReporting, steadyState: c.steadyState, image: o.image });
  try {
    await w.setup(lab);
    if (c.steadyState) res.preworkMs = await settleBalloon(lab, 120_000);
    const oomBefore = (await guestVmstat(lab.shell)).oom_kill ?? 0;
    let extraPrepareMs = 0;
    if (c.dropCacheFirst) {
      const t = Date.now();
      await lab.shell.run("sync; echo 1 > /proc/sys/vm/drop_caches; sleep 3");
      extraPrepareMs = Date.now() - t;
    }
    if (w.writer) await new Promise((r) => setTimeout(r, 6000)); // a baseline for the writer's rate
    const mem = await guestMeminfo(lab.shell);
    // With deflate-on-oom the balloon's pages count as used in MemAvailable: take them out.
    const balloonActual = Number((await lab.vm()).balloon?.actualBytes ?? BigInt(1024 * MiB));
    res.workingSetBytes = balloonActual - (mem.MemAvailable ?? 0);
    const offset = w.writer ? await guestClockOffsetMs(lab.shell) : 0;
    const beforeFrom = Date.now() - 5000;
    const migrateFrom = Date.now();
    const m: Migration = await lab.migrate(
      {
        mode: c.mode,
        balloonStrategy: c.strategy,
        maxBandwidthBytesPerSec: BigInt(o.bandwidthBytesPerSec),
        prepareDeadlineMs: 30_000,
        postcopyAfterPasses: c.mode === MigrationMode.HYBRID ? 1 : 0,
      },
      w.burst ? { onPostcopy: async (shell) => void (await shell.run("touch /tmp/burst.go", { timeoutMs: 60_000 })) } : {},
    );
    const migrateTo = Date.now();
    if (m.phase !== Phase.COMPLETED) throw new Error(`migration ${Phase[m.phase]}: ${m.error}`);
    if (w.burst) await lab.shell.run("touch /tmp/burst.go; for i in $(seq 1 60); do grep -q burst-done /tmp/burst.out 2>/dev/null && break; sleep 1; done", { timeoutMs: 90_000 });
    const s = m.sourceStats;
    res.transferredBytes = Number(s?.transferredBytes ?? 0n);
    res.normalPages = Number(s?.normalPages ?? 0n);
    res.duplicatePages = Number(s?.duplicatePages ?? 0n);
    res.prepareMs = Number(m.prepareMs) + extraPrepareMs;
    res.migrateMs = Number(m.migrateMs);
    res.totalMs = res.prepareMs + res.migrateMs;
    res.qemuTotalTimeMs = Number(s?.totalTimeMs ?? 0n);
    res.downtimeMs = Number(s?.downtimeMs ?? 0n);
    res.passes = Number(s?.dirtySyncCount ?? 0n);
    res.postcopyRequests = Number(s?.postcopyRequests ?? 0n);
    res.blocktimeMs = Number(m.destinationStats?.postcopyBlocktimeMs ?? 0n);
    res.balloonMinBytes = m.balloonTimeline.reduce((a, p) => Math.min(a, Number(p.actualBytes)), 1024 * MiB);
    res.oomKills = ((await guestVmstat(lab.shell)).oom_kill ?? 0) - oomBefore;
    if (w.writer) {
      const pts = await hotWriterProgress(lab.shell);
      res.writerRateBeforeMiBs = rateBetween(pts, beforeFrom + offset, migrateFrom + offset);
      res.writerRateDuringMiBs = rateBetween(pts, migrateFrom + offset, migrateTo + offset);
    }
    res.ok = true;
  } catch (err) {
    // Keep the evidence: the lab removes its work dir on stop.
    const tails = Object.values(lab.hosts)
      .flatMap((h) => (h.vm ? [`${h.name} qemu: ${tail(h.vm.qemuLog)}`, `${h.name} serial: ${tail(h.vm.serialLog)}`] : []))
      .join(" | ");
    // What the guest itself says, if its shell still answers.
    const guest = await lab.shell
      .run("tail -n 15 /tmp/agent.log; cat /tmp/burst.out 2>/dev/null; grep -E '^(MemFree|MemAvailable):' /proc/meminfo", { timeoutMs: 15_000 })
      .then((r) => r.output.replace(/\s+/g, " ").slice(-1500))
      .catch(() => "");
    res.error = `${errorMessage(err)}${tails ? ` [${tails}]` : ""}${guest ? ` [guest: ${guest}]` : ""}`;
  } finally {
    await lab.stop();
  }
  return res;
}

function tail(file: string, bytes = 400): string {
  try {
    return readFileSync(file, "utf8").slice(-bytes).replace(/\s+/g, " ").trim();
  } catch {
    return "(no log)";
  }
}

/** Runs every selected (workload, configuration) pair `reps` times, interleaving configurations per repetition. */
export async function runMatrix(o: MatrixOptions): Promise<RunResult[]> {
  const cells: [Workload, BenchConfig][] = [];
  for (const wid of o.workloads) {
    for (const c of CONFIGS) if (o.configs.includes(c.id) && c.workloads.includes(wid)) cells.push([WORKLOADS[wid], c]);
  }
  const total = cells.length * o.reps;
  const results: RunResult[] = [];
  let n = 0;
  // Repetition-major order: a noisy minute hits every configuration, not one.
  for (let rep = 1; rep <= o.reps; rep++) {
    for (const [w, c] of cells) {
      n++;
      const t = Date.now();
      const r = await runOnce(w, c, rep, o);
      results.push(r);
      const what = r.ok
        ? `${(r.transferredBytes / MiB).toFixed(0)} MiB, total ${(r.totalMs / 1000).toFixed(1)} s, downtime ${r.downtimeMs} ms`
        : `FAILED: ${r.error}`;
      o.onProgress?.(`[${n}/${total}] (${w.id}) ${c.id} rep ${rep}: ${what}  (${((Date.now() - t) / 1000).toFixed(0)} s)`);
    }
  }
  return results;
}
