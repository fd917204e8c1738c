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

/** Checks a MigrateRequest and fills in defaults. Throws InvalidArgumentError naming the field. */
export function validateMigrateRequest(req: MigrateRequest, defaults: MigrationDefaults): MigrateParams {
  if (!req.vm) throw new InvalidArgumentError("vm: required");
  if (!req.destination) throw new InvalidArgumentError("destination: required (host:port of the destination coordinator)");
  try {
    splitHostPort(req.destination);
  } catch (err) {
    throw new InvalidArgumentError(`destination: ${(err as Error).message}`);
  }
  if (!(req.mode in MigrationMode)) throw new InvalidArgumentError(`mode: unknown value ${req.mode}`);
  if (!(req.balloonStrategy in BalloonStrategy)) throw new InvalidArgumentError(`balloon_strategy: unknown value ${req.balloonStrategy}`);
  const bw = req.maxBandwidthBytesPerSec === 0n ? defaults.maxBandwidthBytesPerSec : safe(req.maxBandwidthBytesPerSec, "max_bandwidth_bytes_per_sec");
  if (bw < 1000) throw new InvalidArgumentError(`max_bandwidth_bytes_per_sec: ${bw} is below 1000 B/s`);
  const downtime = req.downtimeLimitMs === 0 ? defaults.downtimeLimitMs : req.downtimeLimitMs;
  if (downtime > 60_000) throw new InvalidArgumentError(`downtime_limit_ms: ${downtime} is above 60000`);
  const deadline = req.prepareDeadlineMs === 0 ? defaults.prepareDeadlineMs : req.prepareDeadlineMs;
  if (deadline > 600_000) throw new InvalidArgumentError(`prepare_deadline_ms: ${deadline} is above 600000`);
  const mode = req.mode === MigrationMode.UNSPECIFIED ? MigrationMode.PRECOPY : req.mode;
  const passes = req.postcopyAfterPasses === 0 ? 1 : req.postcopyAfterPasses;
  if (passes > 100) throw new InvalidArgumentError(`postcopy_after_passes: ${passes} is above 100`);
  if (req.postcopyAfterPasses !== 0 && mode !== MigrationMode.HYBRID) {
    throw new InvalidArgumentError("postcopy_after_passes: only meaningful with MIGRATION_MODE_HYBRID");
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

/** Checks that an id field is present. */
export function requireId(id: string, field = "id"): string {
  if (!id) throw new InvalidArgumentError(`${field}: required`);
  return id;
}

function safe(v: bigint, field: string): number {
  try {
    return toNumber(v);
  } catch {
    throw new InvalidArgumentError(`${field}: ${v} is out of range`);
  }
}
