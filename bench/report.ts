/**
 * Turns matrix results into what people read: markdown tables with medians,
 * spreads and ratios against the baseline measured in the same run, the
 * targets of the issue with met/missed, and an SVG chart.
 */
import { MigrationMode } from "../gen/ballast/v1/common_pb.js";
import { MiB } from "../shared/units.js";
import { CONFIGS, WORKLOADS, type RunResult, type Workload } from "./matrix.js";
import { median, spread } from "./stats.js";

/** Median and spread of one metric over a cell's successful runs. */
export interface CellStat {
  median: number;
  min: number;
  max: number;
  n: number;
}

/** Per (workload, config) summary. */
export interface Cell {
  workload: Workload["id"];
  config: string;
  runs: number;
  failures: number;
  bytes: CellStat;
  totalMs: CellStat;
  prepareMs: CellStat;
  downtimeMs: CellStat;
  passes: CellStat;
  postcopyRequests: CellStat;
  blocktimeMs: CellStat;
  oomKills: number;
  writerSlowdown: CellStat;
  workingSet: CellStat;
  preworkMs: CellStat;
}

function stat(values: number[]): CellStat {
  if (values.length === 0) return { median: Number.NaN, min: Number.NaN, max: Number.NaN, n: 0 };
  const s = spread(values);
  return { median: median(values), min: s.min, max: s.max, n: values.length };
}

/** Groups results into cells. */
export function summarizeCells(results: RunResult[]): Cell[] {
  const keys = [...new Set(results.map((r) => `${r.workload}|${r.config}`))];
  return keys.map((k) => {
    const [workload, config] = k.split("|") as [Workload["id"], string];
    const all = results.filter((r) => r.workload === workload && r.config === config);
    const ok = all.filter((r) => r.ok);
    const pick = (f: (r: RunResult) => number) => stat(ok.map(f));
    return {
      workload,
      config,
      runs: all.length,
      failures: all.length - ok.length,
      bytes: pick((r) => r.transferredBytes),
      totalMs: pick((r) => r.totalMs),
      prepareMs: pick((r) => r.prepareMs),
      downtimeMs: pick((r) => r.downtimeMs),
      passes: pick((r) => r.passes),
      postcopyRequests: pick((r) => r.postcopyRequests),
      blocktimeMs: pick((r) => r.blocktimeMs),
      oomKills: ok.reduce((a, r) => a + r.oomKills, 0),
      writerSlowdown: stat(ok.filter((r) => r.writerRateBeforeMiBs > 0).map((r) => r.writerRateDuringMiBs / r.writerRateBeforeMiBs)),
      workingSet: pick((r) => r.workingSetBytes),
      preworkMs: pick((r) => r.preworkMs),
    };
  });
}

/** The baseline a configuration is compared with. */
export function baselineOf(config: string): string {
  const c = CONFIGS.find((x) => x.id === config);
  return c && c.mode !== MigrationMode.PRECOPY ? "plain-postcopy" : "plain-precopy";
}

function fmt(s: CellStat, scale: number, digits: number): string {
  if (s.n === 0) return "–";
  const m = (s.median / scale).toFixed(digits);
  return s.n > 1 ? `${m} [${(s.min / scale).toFixed(digits)}–${(s.max / scale).toFixed(digits)}]` : m;
}

function ratio(a: CellStat | undefined, b: CellStat | undefined): string {
  if (!a || !b || a.n === 0 || b.n === 0 || !(b.median > 0)) return "–";
  return `${(a.median / b.median).toFixed(2)}×`;
}

/** Markdown tables, one per workload. */
export function markdownTables(cells: Cell[]): string {
  const out: string[] = [];
  for (const w of Object.values(WORKLOADS)) {
    const rows = cells.filter((c) => c.workload === w.id);
    if (rows.length === 0) continue;
    out.push(`### (${w.id}) ${w.label}`, "");
    out.push("| configuration | sent MiB | ×base | total s (incl. PREPARE) | ×base | PREPARE s | downtime ms | passes | post-copy req | blocktime ms | OOM | writer during/before | sent ÷ working set | runs |");
    out.push("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (const c of rows) {
      const base = cells.find((x) => x.workload === c.workload && x.config === baselineOf(c.config));
      const label = CONFIGS.find((x) => x.id === c.config)?.label ?? c.config;
      const ws = c.workingSet.n > 0 && c.bytes.n > 0 ? (c.bytes.median / c.workingSet.median).toFixed(2) : "–";
      out.push(
        `| ${label} | ${fmt(c.bytes, MiB, 0)} | ${ratio(c.bytes, base?.bytes)} | ${fmt(c.totalMs, 1000, 1)} | ${ratio(c.totalMs, base?.totalMs)} | ${fmt(c.prepareMs, 1000, 1)} | ${fmt(c.downtimeMs, 1, 0)} | ${fmt(c.passes, 1, 0)} | ${fmt(c.postcopyRequests, 1, 0)} | ${fmt(c.blocktimeMs, 1, 0)} | ${c.oomKills} | ${fmt(c.writerSlowdown, 1, 2)} | ${ws} | ${c.runs - c.failures}/${c.runs} |`,
      );
    }
    const ws = rows[0]?.workingSet;
    if (ws && ws.n > 0) out.push("", `Working set at migration time (balloon actual − MemAvailable): ${fmt(ws, MiB, 0)} MiB.`);
    const steady = rows.find((c) => c.config === "ballast-steady");
    if (steady && steady.preworkMs.n > 0) out.push(`Steady-state self-balloon settled ${fmt(steady.preworkMs, 1000, 1)} s before the request (not part of its total).`);
    out.push("");
  }
  return out.join("\n");
}

/** One target of the issue and whether this run met it. */
export interface TargetCheck {
  target: string;
  measured: string;
  met: boolean | undefined;
}

function cell(cells: Cell[], w: Workload["id"], config: string): Cell | undefined {
  return cells.find((c) => c.workload === w && c.config === config);
}

function check(name: string, a: CellStat | undefined, b: CellStat | undefined, limit: number): TargetCheck {
  if (!a || !b || a.n === 0 || b.n === 0 || !(b.median > 0)) return { target: name, measured: "not measured", met: undefined };
  const r = a.median / b.median;
  return { target: name, measured: `${r.toFixed(2)}×`, met: r <= limit };
}

/** The targets, evaluated for one Ballast pre-copy configuration. */
export function targetChecks(cells: Cell[], ballast: string): TargetCheck[] {
  const c = (cfg: string) => cell(cells, "c", cfg);
  const checks = [
    check(`(c) ${ballast} bytes ≤ 0.35 × plain pre-copy`, c(ballast)?.bytes, c("plain-precopy")?.bytes, 0.35),
    check(`(c) ${ballast} bytes ≤ 0.6 × pre-copy with free-page reporting`, c(ballast)?.bytes, c("fpr-precopy")?.bytes, 0.6),
    check(`(c) ${ballast} total time incl. inflation ≤ 0.6 × plain`, c(ballast)?.totalMs, c("plain-precopy")?.totalMs, 0.6),
    check(`(c) ${ballast} downtime ≤ 1.2 × plain`, c(ballast)?.downtimeMs, c("plain-precopy")?.downtimeMs, 1.2),
  ];
  const pc = cell(cells, "d", "ballast-postcopy");
  const pp = cell(cells, "d", "plain-postcopy");
  checks.push(check("(d) Ballast post-copy requests ≤ 0.5 × plain post-copy", pc?.postcopyRequests, pp?.postcopyRequests, 0.5));
  checks.push({ target: "(d) Ballast post-copy: 0 OOM kills", measured: pc ? `${pc.oomKills}` : "not measured", met: pc ? pc.oomKills === 0 : undefined });
  return checks;
}

/**
 * The Ballast pre-copy strategy with the shortest median total time on the
 * cache-heavy workload (bytes break ties); undefined if none ran there.
 * A strategy with any failed run, on any workload, is not eligible: a
 * default must be safe before it is fast.
 */
export function bestStrategy(cells: Cell[]): string | undefined {
  const failed = new Set(cells.filter((c) => c.failures > 0).map((c) => c.config));
  const candidates = ["ballast-inflate", "ballast-overlap", "ballast-steady"]
    .filter((id) => !failed.has(id))
    .map((id) => cell(cells, "c", id))
    .filter((c): c is Cell => c !== undefined && c.totalMs.n > 0);
  candidates.sort((x, y) => x.totalMs.median - y.totalMs.median || x.bytes.median - y.bytes.median);
  return candidates[0]?.config;
}

/** A bar chart of sent MiB and total seconds per configuration, one group per workload. */
export function svgChart(cells: Cell[]): string {
  const groups = Object.values(WORKLOADS).filter((w) => cells.some((c) => c.workload === w.id));
  const configs = CONFIGS.filter((c) => cells.some((x) => x.config === c.id));
  const colors = ["#888", "#b0b0ff", "#7fc97f", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#999", "#d62728", "#e377c2"];
  const barW = 14;
  const groupW = configs.length * barW + 30;
  const panelH = 220;
  const left = 60;
  const width = left + groups.length * groupW + 260;
  const height = 2 * panelH + 120;
  const maxBytes = Math.max(1, ...cells.map((c) => (c.bytes.n ? c.bytes.max : 0))) / MiB;
  const maxTime = Math.max(1, ...cells.map((c) => (c.totalMs.n ? c.totalMs.max : 0))) / 1000;
  const parts: string[] = [`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11">`];
  parts.push(`<rect width="100%" height="100%" fill="white"/>`);
  const panel = (y0: number, title: string, max: number, value: (c: Cell) => CellStat, scale: number) => {
    parts.push(`<text x="${left}" y="${y0 - 8}" font-size="13" font-weight="bold">${title}</text>`);
    parts.push(`<line x1="${left}" y1="${y0 + panelH}" x2="${left + groups.length * groupW}" y2="${y0 + panelH}" stroke="#333"/>`);
    for (let t = 0; t <= 4; t++) {
      const v = (max * t) / 4;
      const y = y0 + panelH - (panelH * t) / 4;
      parts.push(`<text x="${left - 6}" y="${y + 4}" text-anchor="end">${v.toFixed(0)}</text><line x1="${left}" y1="${y}" x2="${left + groups.length * groupW}" y2="${y}" stroke="#eee"/>`);
    }
    groups.forEach((w, gi) => {
      const gx = left + gi * groupW + 10;
      parts.push(`<text x="${gx + (configs.length * barW) / 2}" y="${y0 + panelH + 14}" text-anchor="middle">(${w.id})</text>`);
      configs.forEach((cfg, ci) => {
        const c = cells.find((x) => x.workload === w.id && x.config === cfg.id);
        if (!c) return;
        const s = value(c);
        if (s.n === 0) return;
        const h = (panelH * s.median) / scale / max;
        const x = gx + ci * barW;
        parts.push(`<rect x="${x}" y="${y0 + panelH - h}" width="${barW - 2}" height="${h}" fill="${colors[ci % colors.length]}"><title>${cfg.label}: ${(s.median / scale).toFixed(1)}</title></rect>`);
        if (s.n > 1) {
          const ylo = y0 + panelH - (panelH * s.min) / scale / max;
          const yhi = y0 + panelH - (panelH * s.max) / scale / max;
          parts.push(`<line x1="${x + barW / 2 - 1}" y1="${ylo}" x2="${x + barW / 2 - 1}" y2="${yhi}" stroke="#000"/>`);
        }
      });
    });
  };
  panel(30, "Bytes sent (MiB, median, whiskers = min–max)", maxBytes, (c) => c.bytes, MiB);
  panel(panelH + 90, "Total time incl. PREPARE (s)", maxTime, (c) => c.totalMs, 1000);
  configs.forEach((cfg, ci) => {
    const y = 40 + ci * 16;
    const x = left + groups.length * groupW + 20;
    parts.push(`<rect x="${x}" y="${y - 9}" width="10" height="10" fill="${colors[ci % colors.length]}"/><text x="${x + 14}" y="${y}">${cfg.label}</text>`);
  });
  parts.push("</svg>");
  return parts.join("\n");
}
