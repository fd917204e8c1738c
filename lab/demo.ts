/**
 * `npm run demo`: one real guest, two hosts on this machine, the same
 * workload migrated twice (plain QEMU, then Ballast), and a side-by-side table.
 */
import { BalloonStrategy, Phase } from "../gen/ballast/v1/common_pb.js";
import type { Migration } from "../gen/ballast/v1/migration_pb.js";
import { errorMessage } from "../shared/errors.js";
import { formatMiB } from "../shared/units.js";
import { renderProgress } from "../coordinator/progress.js";
import { Lab } from "./lab.js";
import { ensureHostPackages } from "./preflight.js";
import { cacheRead, freedAnon, guestMeminfo, startHotWriter } from "./workloads.js";

const BANDWIDTH = 125_000_000n;
const tty = process.stdout.isTTY === true;

function say(line: string): void {
  if (tty) process.stdout.write(`\r\x1b[2K${line}\n`);
  else process.stdout.write(`${line}\n`);
}

function status(line: string): void {
  if (tty) process.stdout.write(`\r\x1b[2K${line.slice(0, (process.stdout.columns ?? 100) - 1)}`);
}

/** Fails early, with what is missing, on a machine that cannot run the lab; installs missing host packages as root. */
async function preflight(): Promise<void> {
  try {
    await ensureHostPackages({ onProgress: (s) => say(`• ${s}`) });
  } catch (err) {
    process.stderr.write(`npm run demo cannot run here: ${errorMessage(err)}\n`);
    process.exit(2);
  }
}

function row(name: string, plain: string, ballast: string, ratio = ""): string {
  return `| ${name.padEnd(34)} | ${plain.padStart(14)} | ${ballast.padStart(14)} | ${ratio.padStart(7)} |`;
}

function timeline(m: Migration): string {
  const pts = m.balloonTimeline;
  if (pts.length === 0) return "no change";
  const t0 = Number(m.createdUnixMs);
  const min = pts.reduce((a, p) => (Number(p.actualBytes) < Number(a.actualBytes) ? p : a));
  return `${formatMiB(Number(pts[0]!.actualBytes))} → ${formatMiB(Number(min.actualBytes))} at +${((Number(min.atUnixMs) - t0) / 1000).toFixed(1)} s`;
}

async function migrateWithProgress(lab: Lab, label: string, strategy: BalloonStrategy): Promise<Migration> {
  say(`migrating (${label}) from host ${lab.active} to host ${lab.other} at 1 Gbit/s …`);
  let lastPhase = -1;
  const m = await lab.migrate(
    { balloonStrategy: strategy, maxBandwidthBytesPerSec: BANDWIDTH, prepareDeadlineMs: 30_000 },
    {
      onUpdate: (u) => {
        if (tty) status(`  ${renderProgress(u, (process.stdout.columns ?? 100) - 2)}`);
        else if (u.phase !== lastPhase) say(`  ${renderProgress(u, 200)}`);
        lastPhase = u.phase;
      },
    },
  );
  say(`  ${label}: ${Phase[m.phase]}${m.error ? ` (${m.error})` : ""}`);
  if (m.phase !== Phase.COMPLETED) throw new Error(`${label} migration ended ${Phase[m.phase]}: ${m.error}`);
  return m;
}

async function main(): Promise<void> {
  await preflight();
  say("Ballast demo: the same guest migrated twice, plain QEMU then Ballast.");
  let lab: Lab | undefined;
  try {
    lab = await Lab.start({ memMiB: 1024, onProgress: (s) => say(`• ${s}`) });
    say("• workload: 200 MiB of freed anon memory, 500 MiB of clean page cache, a 64 MiB writer at 16 MiB/s");
    await freedAnon(lab.shell, 200);
    await cacheRead(lab.shell, 500);
    await startHotWriter(lab.shell, { mib: 64, rateMiB: 16 });
    const mem = await guestMeminfo(lab.shell);
    say(`  guest: MemTotal ${formatMiB(mem.MemTotal ?? 0)}, Cached ${formatMiB(mem.Cached ?? 0)}, MemFree ${formatMiB(mem.MemFree ?? 0)}`);

    const plain = await migrateWithProgress(lab, "plain", BalloonStrategy.NONE);
    const ballast = await migrateWithProgress(lab, "Ballast", BalloonStrategy.INFLATE_THEN_MIGRATE);

    const p = plain.sourceStats;
    const b = ballast.sourceStats;
    const bytes = (m: Migration) => Number(m.sourceStats?.transferredBytes ?? 0n);
    const total = (m: Migration) => Number(m.prepareMs) + Number(m.migrateMs);
    const ratio = (x: number, y: number) => (y > 0 ? `${(x / y).toFixed(2)}×` : "–");
    say("");
    say(row("", "plain", "Ballast", "ratio"));
    say(`|${"-".repeat(36)}|${"-".repeat(16)}|${"-".repeat(16)}|${"-".repeat(9)}|`);
    say(row("bytes transferred", formatMiB(bytes(plain)), formatMiB(bytes(ballast)), ratio(bytes(ballast), bytes(plain))));
    say(row("total time incl. inflation", `${(total(plain) / 1000).toFixed(1)} s`, `${(total(ballast) / 1000).toFixed(1)} s`, ratio(total(ballast), total(plain))));
    say(row("  of which PREPARE (inflation)", `${(Number(plain.prepareMs) / 1000).toFixed(1)} s`, `${(Number(ballast.prepareMs) / 1000).toFixed(1)} s`));
    say(row("downtime (QEMU)", `${p?.downtimeMs ?? "?"} ms`, `${b?.downtimeMs ?? "?"} ms`));
    say(row("passes (dirty syncs)", `${p?.dirtySyncCount ?? "?"}`, `${b?.dirtySyncCount ?? "?"}`));
    say(row("post-copy requests", "not used", "not used"));
    say("");
    say(`balloon timeline (Ballast): ${timeline(ballast)}`);
    say(`guest after both migrations: ${(await lab.shell.run("echo alive")).output.trim()} on host ${lab.active}`);
    say(`bytes saved: ${formatMiB(bytes(plain) - bytes(ballast))} (${((1 - bytes(ballast) / Math.max(1, bytes(plain))) * 100).toFixed(0)}%)`);
  } finally {
    if (lab) {
      say("• stopping the lab");
      await lab.stop();
    }
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`\ndemo failed: ${errorMessage(err)}\n`);
  process.exit(1);
});
