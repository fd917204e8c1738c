/**
 * Text rendering of a migration for ballastctl: a one-line progress bar and
 * a multi-line summary. Pure, so it is tested without a terminal.
 */
import { AgentState, Phase } from "../gen/ballast/v1/common_pb.js";
import type { Migration } from "../gen/ballast/v1/migration_pb.js";
import { formatMiB } from "../shared/units.js";

/** Short phase label, e.g. "PRECOPY_PASS 2". */
export function phaseLabel(m: Pick<Migration, "phase" | "pass">): string {
  const name = m.phase === Phase.UNSPECIFIED ? "STARTING" : (Phase[m.phase] ?? `PHASE_${m.phase}`);
  return m.phase === Phase.PRECOPY_PASS ? `${name} ${m.pass}` : name;
}

/**
 * One line: phase, a bar of bytes sent against bytes known, balloon and agent.
 * The bar compares transferred with transferred + remaining, which is what
 * QEMU knows at this moment (remaining shrinks as passes converge).
 */
export function renderProgress(m: Migration, columns: number): string {
  const sent = Number(m.transferredBytes);
  const remaining = Number(m.remainingBytes);
  const frac = sent + remaining > 0 ? sent / (sent + remaining) : m.phase === Phase.COMPLETED ? 1 : 0;
  const tail = ` ${(frac * 100).toFixed(0).padStart(3)}%  sent ${formatMiB(sent)}  left ${formatMiB(remaining)}  balloon ${formatMiB(Number(m.balloon?.actualBytes ?? 0n))}  agent ${AgentState[m.agentState] ?? "?"}`;
  const head = `[${phaseLabel(m)}] `;
  const width = Math.max(10, Math.min(40, columns - head.length - tail.length - 2));
  const filled = Math.round(frac * width);
  return `${head}${"█".repeat(filled)}${"░".repeat(width - filled)}${tail}`;
}

/** A few lines for the end of a migration. */
export function summarize(m: Migration): string {
  const s = m.sourceStats;
  const d = m.destinationStats;
  const lines = [
    `migration ${m.id} of ${m.vm} to ${m.destination}: ${Phase[m.phase]}${m.error ? ` (${m.error})` : ""}`,
    `  prepare ${m.prepareMs} ms, migrate ${m.migrateMs} ms, balloon before ${formatMiB(Number(m.balloonTargetBeforeBytes))}, now ${formatMiB(Number(m.balloon?.actualBytes ?? 0n))}`,
  ];
  if (s) {
    lines.push(
      `  source: transferred ${formatMiB(Number(s.transferredBytes))}, total-time ${s.totalTimeMs} ms, downtime ${s.downtimeMs} ms, passes ${s.dirtySyncCount}, postcopy-requests ${s.postcopyRequests}`,
    );
  }
  if (d) lines.push(`  destination: postcopy-blocktime ${d.postcopyBlocktimeMs} ms`);
  return lines.join("\n");
}
