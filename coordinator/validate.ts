/**
 * Validation of control-plane requests, kept pure so it can be table-tested.
 * Handlers call these first; the domain only ever sees valid parameters.
 */
import { BalloonStrategy, MigrationMode } from "../gen/ballast/v1/common_pb.js";
import type { MigrateRequest } from "../gen/ballast/v1/migration_pb.js";
import { InvalidArgumentError } from "../shared/errors.js";
import { splitHostPort } from "../shared/net.js";
import { toNumber } from "../shared/units.js";
import type { MigrationDefaults } from "./config.js";
import type { MigrateParams } from "./migration-record.js";

/** The strategy used when a request names none. Chosen from `npm run bench` results (docs/benchmarks.md). */
export const DEFAULT_STRATEGY = BalloonStrategy.INFLATE_THEN_MIGRATE;

/** Bounds of the request fields (bytes/s, ms, passes). */
const MIN_BANDWIDTH = 1000;
const MAX_DOWNTIME_MS = 60_000;
const MAX_PREPARE_DEADLINE_MS = 600_000;
const MAX_POSTCOPY_AFTER = 100;

/**
 * Checks a MigrateRequest and fills in defaults. Throws InvalidArgumentError
 * with one field violation (the request's proto field name); the message
 * names the ballastctl flag that sets the field, which is what an operator
 * typed.
 */
export function validateMigrateRequest(req: MigrateRequest, defaults: MigrationDefaults): MigrateParams {
  if (!req.vm) throw bad("vm", "a VM name is required (ballastctl migrate VM --to HOST:PORT)");
  if (!req.destination) throw bad("destination", "--to HOST:PORT (the destination coordinator) is required");
  try {
    splitHostPort(req.destination);
  } catch (err) {
    throw bad("destination", `--to: ${(err as Error).message}`);
  }
  if (!(req.mode in MigrationMode)) throw bad("mode", `--mode: unknown value ${req.mode} (precopy, postcopy or hybrid)`);
  if (!(req.balloonStrategy in BalloonStrategy)) throw bad("balloon_strategy", `--strategy: unknown value ${req.balloonStrategy} (inflate, overlap, steady or none)`);
  const bw = req.maxBandwidthBytesPerSec === 0n ? defaults.maxBandwidthBytesPerSec : safe(req.maxBandwidthBytesPerSec, "max_bandwidth_bytes_per_sec", "--bandwidth");
  if (bw < MIN_BANDWIDTH) throw bad("max_bandwidth_bytes_per_sec", `--bandwidth: ${bw} bytes/s is below the minimum of ${MIN_BANDWIDTH} bytes/s (1kB)`);
  const downtime = req.downtimeLimitMs === 0 ? defaults.downtimeLimitMs : req.downtimeLimitMs;
  if (downtime > MAX_DOWNTIME_MS) throw bad("downtime_limit_ms", `--downtime-ms: ${downtime} is above the maximum of ${MAX_DOWNTIME_MS}`);
  const deadline = req.prepareDeadlineMs === 0 ? defaults.prepareDeadlineMs : req.prepareDeadlineMs;
  if (deadline > MAX_PREPARE_DEADLINE_MS) throw bad("prepare_deadline_ms", `--prepare-deadline-ms: ${deadline} is above the maximum of ${MAX_PREPARE_DEADLINE_MS}`);
  const mode = req.mode === MigrationMode.UNSPECIFIED ? MigrationMode.PRECOPY : req.mode;
  const passes = req.postcopyAfterPasses === 0 ? 1 : req.postcopyAfterPasses;
  if (passes > MAX_POSTCOPY_AFTER) throw bad("postcopy_after_passes", `--postcopy-after: ${passes} is above the maximum of ${MAX_POSTCOPY_AFTER}`);
  if (req.postcopyAfterPasses !== 0 && mode !== MigrationMode.HYBRID) {
    throw bad("postcopy_after_passes", "--postcopy-after applies only to --mode hybrid");
  }
  return {
    vm: req.vm,
    destination: req.destination,
    mode,
    strategy: req.balloonStrategy === BalloonStrategy.UNSPECIFIED ? DEFAULT_STRATEGY : req.balloonStrategy,
    maxBandwidthBytesPerSec: bw,
    downtimeLimitMs: downtime,
    prepareDeadlineMs: deadline,
    postcopyAfterPasses: passes,
  };
}

/** What an id field is, for "... is required". */
const ID_NAMES: Record<string, string> = { id: "a migration id", migration_id: "a migration id", name: "a VM name", vm: "a VM name" };

/** Checks that an id field (named by its proto field name) is present. */
export function requireId(id: string, field = "id"): string {
  if (!id) throw bad(field, `${ID_NAMES[field] ?? field} is required (${field})`);
  // Names and ids are short; a long one is refused without echoing it.
  if (id.length > MAX_ID_CHARS) throw bad(field, `${ID_NAMES[field] ?? field} is ${id.length} characters long; at most ${MAX_ID_CHARS} are allowed (${field})`);
  return id;
}

/** Longest VM name or migration id a request may carry. */
export const MAX_ID_CHARS = 256;

function bad(field: string, message: string): InvalidArgumentError {
  return InvalidArgumentError.field(field, message);
}

function safe(v: bigint, field: string, flag: string): number {
  try {
    return toNumber(v);
  } catch {
    throw bad(field, `${flag}: ${v} bytes/s is out of range`);
  }
}
