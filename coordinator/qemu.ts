/**
 * Typed wrappers over the QMP commands Ballast uses, plus a pure parser for
 * `query-migrate`. Field names follow QEMU 7.2's QAPI schema (checked with
 * `query-qmp-schema` against the installed binary).
 */
import { InvalidArgumentError } from "../shared/errors.js";
import type { QmpClient } from "./qmp-client.js";

/**
 * One `query-migrate` answer, flattened. QEMU omits whole sections depending
 * on state and side (setup has no `ram`; the destination reports only
 * `status` and, with the `postcopy-blocktime` capability, blocktime), so a
 * missing field reads as 0 (or "" for `errorDesc`); `raw` keeps the answer
 * as received for anyone who must tell "absent" from "0".
 */
export interface MigrateStats {
  /** QEMU MigrationStatus, e.g. "setup", "active", "postcopy-active", "completed", "failed"; "none" when QEMU omits it (no migration yet). */
  status: string;
  /** `total-time`. QEMU 7.2 sometimes reports 0 in the first `completed` answer; kept as is. */
  totalTimeMs: number;
  /** `downtime` (completed only). */
  downtimeMs: number;
  /** `setup-time`. */
  setupTimeMs: number;
  /** `ram.transferred`. */
  transferredBytes: number;
  /** `ram.remaining`. */
  remainingBytes: number;
  /** `ram.total`. */
  totalBytes: number;
  /** `ram.duplicate`: zero pages sent as a marker only. */
  duplicatePages: number;
  /** `ram.normal`. */
  normalPages: number;
  /** `ram.normal-bytes`. */
  normalBytes: number;
  /** `ram.dirty-sync-count`: number of dirty-bitmap syncs, roughly passes. */
  dirtySyncCount: number;
  /** `ram.postcopy-requests` (source side). */
  postcopyRequests: number;
  /** `ram.precopy-bytes`. */
  precopyBytes: number;
  /** `ram.postcopy-bytes`. */
  postcopyBytes: number;
  /** `postcopy-blocktime` (destination side, needs the `postcopy-blocktime` capability). */
  postcopyBlocktimeMs: number;
  /** `ram.mbps`: QEMU's current throughput estimate in Mbit/s. */
  mbps: number;
  /** `error-desc` (failed only), else "". */
  errorDesc: string;
  /** The answer as received. */
  raw: unknown;
}

const WHERE = "query-migrate";

/**
 * Parses a `query-migrate` answer. Tolerant of missing sections and fields,
 * strict about types: a present field of the wrong type throws
 * InvalidArgumentError naming it (e.g. `ram.transferred`), because a silently
 * zeroed counter would corrupt every comparison built on it.
 */
export function parseQueryMigrate(raw: unknown): MigrateStats {
  const top = asRecord(raw, WHERE);
  const ram = top.ram === undefined ? {} : asRecord(top.ram, `${WHERE}: ram`);
  const status = top.status === undefined ? "none" : str(top.status, "status");
  return {
    status,
    totalTimeMs: int(top, "total-time", ""),
    downtimeMs: int(top, "downtime", ""),
    setupTimeMs: int(top, "setup-time", ""),
    transferredBytes: int(ram, "transferred", "ram."),
    remainingBytes: int(ram, "remaining", "ram."),
    totalBytes: int(ram, "total", "ram."),
    duplicatePages: int(ram, "duplicate", "ram."),
    normalPages: int(ram, "normal", "ram."),
    normalBytes: int(ram, "normal-bytes", "ram."),
    dirtySyncCount: int(ram, "dirty-sync-count", "ram."),
    postcopyRequests: int(ram, "postcopy-requests", "ram."),
    precopyBytes: int(ram, "precopy-bytes", "ram."),
    postcopyBytes: int(ram, "postcopy-bytes", "ram."),
    postcopyBlocktimeMs: int(top, "postcopy-blocktime", ""),
    mbps: num(ram, "mbps", "ram."),
    errorDesc: top["error-desc"] === undefined ? "" : str(top["error-desc"], "error-desc"),
    raw,
  };
}

/**
 * Typed access to one QEMU process. Thin on purpose: each method is one QMP
 * command with its arguments validated and its answer typed; policy lives in
 * the callers.
 */
export class Qemu {
  /** The underlying client, for events and commands not wrapped here. */
  readonly qmp: QmpClient;

  /** Wraps an existing (connected or soon connected) client. */
  constructor(qmp: QmpClient) {
    this.qmp = qmp;
  }

  /**
   * QMP `balloon`: asks the guest to shrink or grow to `valueBytes` of RAM.
   * QEMU rejects 0 ("Parameter 'target' expects a size") and silently caps
   * values above the RAM size, so only positive integers are accepted here.
   */
  async balloon(valueBytes: number): Promise<void> {
    if (!Number.isSafeInteger(valueBytes) || valueBytes <= 0) {
      throw new InvalidArgumentError(`balloon: value must be a positive integer number of bytes, got ${String(valueBytes)}`);
    }
    await this.qmp.execute("balloon", { value: valueBytes });
  }

  /**
   * QMP `query-balloon`: the guest's current memory size in bytes as the
   * balloon driver reports it. Without a guest driver it stays at the RAM size.
   */
  async queryBalloon(): Promise<number> {
    const r = asRecord(await this.qmp.execute("query-balloon"), "query-balloon");
    if (r.actual === undefined) throw new InvalidArgumentError("query-balloon: actual is missing");
    return int(r, "actual", "", "query-balloon");
  }

  /** QMP `query-status`: run state such as "prelaunch", "running", "paused", "inmigrate", "postmigrate". */
  async queryStatus(): Promise<{ status: string; running: boolean }> {
    const r = asRecord(await this.qmp.execute("query-status"), "query-status");
    if (typeof r.running !== "boolean") throw new InvalidArgumentError(`query-status: running must be a boolean, got ${describe(r.running)}`);
    return { status: str(r.status, "status", "query-status"), running: r.running };
  }

  /** `query-memory-size-summary` `base-memory`: the `-m` size, excluding hot-plugged memory. */
  async ramSizeBytes(): Promise<number> {
    const r = asRecord(await this.qmp.execute("query-memory-size-summary"), "query-memory-size-summary");
    if (r["base-memory"] === undefined) throw new InvalidArgumentError("query-memory-size-summary: base-memory is missing");
    return int(r, "base-memory", "", "query-memory-size-summary");
  }

  /**
   * `migrate-set-capabilities`, e.g. `{ events: true, "postcopy-ram": true }`.
   * Must be set on both source and destination (before `migrate-incoming`
   * on the destination) for post-copy and events to work.
   */
  async setMigrationCapabilities(caps: Record<string, boolean>): Promise<void> {
    const capabilities = Object.entries(caps).map(([capability, state]) => {
      if (typeof state !== "boolean") {
        throw new InvalidArgumentError(`migrate-set-capabilities: ${capability} must be true or false, got ${describe(state)}`);
      }
      return { capability, state };
    });
    if (capabilities.length === 0) return;
    await this.qmp.execute("migrate-set-capabilities", { capabilities });
  }

  /**
   * `migrate-set-parameters` for the two knobs Ballast tunes. QEMU 7.2's
   * default `max-bandwidth` is only 32 MiB/s, so callers should always set it.
   * Does nothing when neither is given.
   */
  async setMigrationParameters(params: { maxBandwidthBytesPerSec?: number; maxPostcopyBandwidthBytesPerSec?: number; downtimeLimitMs?: number }): Promise<void> {
    const args: Record<string, unknown> = {};
    if (params.maxBandwidthBytesPerSec !== undefined) {
      args["max-bandwidth"] = nonNegativeInt(params.maxBandwidthBytesPerSec, "maxBandwidthBytesPerSec");
    }
    if (params.maxPostcopyBandwidthBytesPerSec !== undefined) {
      args["max-postcopy-bandwidth"] = nonNegativeInt(params.maxPostcopyBandwidthBytesPerSec, "maxPostcopyBandwidthBytesPerSec");
    }
    if (params.downtimeLimitMs !== undefined) {
      args["downtime-limit"] = nonNegativeInt(params.downtimeLimitMs, "downtimeLimitMs");
    }
    if (Object.keys(args).length === 0) return;
    await this.qmp.execute("migrate-set-parameters", args);
  }

  /** `migrate` on the source, e.g. `tcp:127.0.0.1:4444`. Returns once QEMU accepted it; watch `MIGRATION` events or poll for the outcome. */
  async migrate(uri: string): Promise<void> {
    await this.qmp.execute("migrate", { uri: nonEmpty(uri, "migrate: uri") });
  }

  /** `migrate` with `resume: true`: continues a post-copy migration paused by a broken stream, to the destination's `migrate-recover` URI. */
  async migrateResume(uri: string): Promise<void> {
    await this.qmp.execute("migrate", { uri: nonEmpty(uri, "migrate (resume): uri"), resume: true });
  }

  /** `migrate-recover` on a destination in `postcopy-paused`: listens on `uri` for the source to resume. */
  async migrateRecover(uri: string): Promise<void> {
    await this.qmp.execute("migrate-recover", { uri: nonEmpty(uri, "migrate-recover: uri") });
  }

  /** `migrate-incoming` on a destination started with `-incoming defer`. */
  async migrateIncoming(uri: string): Promise<void> {
    await this.qmp.execute("migrate-incoming", { uri: nonEmpty(uri, "migrate-incoming: uri") });
  }

  /** `migrate-start-postcopy`; fails with GenericError unless `postcopy-ram` was enabled before `migrate`. */
  async startPostcopy(): Promise<void> {
    await this.qmp.execute("migrate-start-postcopy");
  }

  /** `migrate_cancel` (QEMU 7.2 spells it with an underscore). */
  async migrateCancel(): Promise<void> {
    await this.qmp.execute("migrate_cancel");
  }

  /** `query-migrate`, parsed by {@link parseQueryMigrate}. */
  async queryMigrate(): Promise<MigrateStats> {
    return parseQueryMigrate(await this.qmp.execute("query-migrate"));
  }

  /** `cont`: resumes vCPUs (after `-S`, or on a destination left paused). */
  async cont(): Promise<void> {
    await this.qmp.execute("cont");
  }
}

// ---- strict field readers -------------------------------------------------

function asRecord(v: unknown, where: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new InvalidArgumentError(`${where}: expected an object, got ${describe(v)}`);
  }
  return v as Record<string, unknown>;
}

function str(v: unknown, field: string, where = WHERE): string {
  if (typeof v !== "string") throw new InvalidArgumentError(`${where}: ${field} must be a string, got ${describe(v)}`);
  return v;
}

/**
 * An optional counter: absent reads as 0; anything but a non-negative safe integer throws (QEMU's
 * counters are never negative, and one beyond 2^53 would not be exact, e.g. 1e300 or JSON's 1e400).
 */
function int(obj: Record<string, unknown>, key: string, prefix: string, where = WHERE): number {
  const v = obj[key];
  if (v === undefined) return 0;
  if (typeof v !== "number" || !Number.isInteger(v)) {
    throw new InvalidArgumentError(`${where}: ${prefix}${key} must be an integer, got ${describe(v)}`);
  }
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new InvalidArgumentError(`${where}: ${prefix}${key} must be an integer in [0, 2^53), got ${describe(v)}`);
  }
  return v;
}

/** An optional number field (QAPI `number`, e.g. mbps). */
function num(obj: Record<string, unknown>, key: string, prefix: string, where = WHERE): number {
  const v = obj[key];
  if (v === undefined) return 0;
  if (typeof v !== "number" || !Number.isFinite(v)) {
    throw new InvalidArgumentError(`${where}: ${prefix}${key} must be a number, got ${describe(v)}`);
  }
  return v;
}

function nonNegativeInt(v: number, name: string): number {
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new InvalidArgumentError(`migrate-set-parameters: ${name} must be a non-negative integer, got ${String(v)}`);
  }
  return v;
}

function nonEmpty(v: string, where: string): string {
  if (typeof v !== "string" || v.length === 0) throw new InvalidArgumentError(`${where} must be a non-empty string`);
  return v;
}

function describe(v: unknown): string {
  if (v === undefined) return "nothing";
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  return `${typeof v} ${JSON.stringify(v)?.slice(0, 40)}`;
}
