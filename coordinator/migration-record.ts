/**
 * The migration record: everything the coordinator knows about one
 * migration, in domain units (numbers, ms), plus its mapping to the wire.
 */
import { create } from "@bufbuild/protobuf";
import { AgentState, BalloonStrategy, MigrationMode, MigrationStatsSchema, Phase, type MigrationStats } from "../gen/ballast/v1/common_pb.js";
import { MigrationSchema, type Migration } from "../gen/ballast/v1/migration_pb.js";
import { toNumber, toU64 } from "../shared/units.js";
import type { MigrateStats } from "./qemu.js";

/** Parameters of a migration after validation and defaults. */
export interface MigrateParams {
  vm: string;
  destination: string;
  mode: MigrationMode;
  strategy: BalloonStrategy;
  maxBandwidthBytesPerSec: number;
  downtimeLimitMs: number;
  prepareDeadlineMs: number;
  postcopyAfterPasses: number;
}

/** Which side of the migration this coordinator is. */
export type MigrationDirection = "outgoing" | "incoming";

/** Something done after a migration ended (balloon restored, QEMU migration cancelled after a restart). */
export interface CleanupEntry {
  atMs: number;
  action: string;
  ok: boolean;
  detail: string;
}

/**
 * Domain record of one migration, folded from its events
 * (migration-events.ts). Records handed out by the store are snapshots:
 * change a migration by appending an event, not by assigning fields.
 */
export interface MigrationRecord extends MigrateParams {
  id: string;
  direction: MigrationDirection;
  phase: Phase;
  pass: number;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  balloonTargetBytes: number;
  balloonActualBytes: number;
  ramBytes: number;
  agentState: AgentState;
  createdMs: number;
  updatedMs: number;
  prepareMs: number;
  migrateMs: number;
  error: string;
  balloonTargetBeforeBytes: number;
  sourceStats?: MigrateStats;
  destinationStats?: MigrateStats;
  phases: { phase: Phase; pass: number; atMs: number }[];
  balloonTimeline: { atMs: number; actualBytes: number; targetBytes: number }[];
  /** QEMU accepted `migrate`: a migration there may need cancelling. */
  migrateIssued: boolean;
  /** Work done after the end, in order. */
  cleanups: CleanupEntry[];
}

/** Phases in which a migration is over. */
export const FINAL_PHASES: ReadonlySet<Phase> = new Set([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED]);

/** Whether the record has reached a final phase. */
export function isFinal(r: Pick<MigrationRecord, "phase">): boolean {
  return FINAL_PHASES.has(r.phase);
}

/** Maps domain stats to the wire message. */
export function statsToProto(s: MigrateStats | undefined): MigrationStats | undefined {
  if (!s) return undefined;
  return create(MigrationStatsSchema, {
    status: s.status,
    totalTimeMs: BigInt(Math.round(s.totalTimeMs)),
    downtimeMs: BigInt(Math.round(s.downtimeMs)),
    setupTimeMs: BigInt(Math.round(s.setupTimeMs)),
    transferredBytes: toU64(s.transferredBytes),
    remainingBytes: toU64(s.remainingBytes),
    totalBytes: toU64(s.totalBytes),
    duplicatePages: toU64(s.duplicatePages),
    normalPages: toU64(s.normalPages),
    normalBytes: toU64(s.normalBytes),
    dirtySyncCount: toU64(s.dirtySyncCount),
    postcopyRequests: toU64(s.postcopyRequests),
    precopyBytes: toU64(s.precopyBytes),
    postcopyBytes: toU64(s.postcopyBytes),
    postcopyBlocktimeMs: BigInt(Math.round(s.postcopyBlocktimeMs)),
    mbps: s.mbps,
    rawJson: JSON.stringify(s.raw ?? null),
  });
}

/** Maps wire stats (e.g. from a peer) back to domain stats. */
export function statsFromProto(st: MigrationStats): MigrateStats {
  let raw: unknown = st.rawJson;
  try {
    raw = JSON.parse(st.rawJson);
  } catch {
    // keep the text as it came
  }
  return {
    status: st.status,
    totalTimeMs: toNumber(st.totalTimeMs),
    downtimeMs: toNumber(st.downtimeMs),
    setupTimeMs: toNumber(st.setupTimeMs),
    transferredBytes: toNumber(st.transferredBytes),
    remainingBytes: toNumber(st.remainingBytes),
    totalBytes: toNumber(st.totalBytes),
    duplicatePages: toNumber(st.duplicatePages),
    normalPages: toNumber(st.normalPages),
    normalBytes: toNumber(st.normalBytes),
    dirtySyncCount: toNumber(st.dirtySyncCount),
    postcopyRequests: toNumber(st.postcopyRequests),
    precopyBytes: toNumber(st.precopyBytes),
    postcopyBytes: toNumber(st.postcopyBytes),
    postcopyBlocktimeMs: toNumber(st.postcopyBlocktimeMs),
    mbps: st.mbps,
    errorDesc: "",
    raw,
  };
}

/** Maps a record to the wire message. */
export function recordToProto(r: MigrationRecord): Migration {
  return create(MigrationSchema, {
    id: r.id,
    vm: r.vm,
    destination: r.destination,
    mode: r.mode,
    balloonStrategy: r.strategy,
    phase: r.phase,
    pass: r.pass,
    transferredBytes: toU64(r.transferredBytes),
    remainingBytes: toU64(r.remainingBytes),
    totalBytes: toU64(r.totalBytes),
    balloon: { targetBytes: toU64(r.balloonTargetBytes), actualBytes: toU64(r.balloonActualBytes), ramBytes: toU64(r.ramBytes) },
    agentState: r.agentState,
    createdUnixMs: BigInt(r.createdMs),
    updatedUnixMs: BigInt(r.updatedMs),
    prepareMs: BigInt(Math.round(r.prepareMs)),
    migrateMs: BigInt(Math.round(r.migrateMs)),
    error: errorWithCleanups(r),
    balloonTargetBeforeBytes: toU64(r.balloonTargetBeforeBytes),
    sourceStats: statsToProto(r.sourceStats),
    destinationStats: statsToProto(r.destinationStats),
    phases: r.phases.map((p) => ({ phase: p.phase, pass: p.pass, atUnixMs: BigInt(p.atMs) })),
    balloonTimeline: r.balloonTimeline.map((b) => ({ atUnixMs: BigInt(b.atMs), actualBytes: toU64(b.actualBytes), targetBytes: toU64(b.targetBytes) })),
  });
}

const POSTCOPY_STATE = new Set(["postcopy-paused", "postcopy-recovered"]);

/**
 * The record's error for the wire: the proto has no cleanup list, so failed
 * cleanups (e.g. the balloon could not be restored) are appended to it.
 */
function errorWithCleanups(r: MigrationRecord): string {
  const failed = r.cleanups.filter((c) => !c.ok && !POSTCOPY_STATE.has(c.action)).map((c) => `${c.action} failed${c.detail ? `: ${c.detail}` : ""}`);
  // A paused post-copy is a condition, not a failure: shown only while it lasts.
  const lastPostcopy = [...r.cleanups].reverse().find((c) => POSTCOPY_STATE.has(c.action));
  const paused = lastPostcopy?.action === "postcopy-paused" ? [`post-copy paused: ${lastPostcopy.detail}`] : [];
  return [r.error, ...paused, ...failed].filter((s) => s !== "").join("; ");
}

/** A fresh record in phase UNSPECIFIED. */
export function newRecord(id: string, params: MigrateParams, nowMs: number, direction: MigrationDirection = "outgoing"): MigrationRecord {
  return {
    ...params,
    id,
    direction,
    phase: Phase.UNSPECIFIED,
    pass: 0,
    transferredBytes: 0,
    remainingBytes: 0,
    totalBytes: 0,
    balloonTargetBytes: 0,
    balloonActualBytes: 0,
    ramBytes: 0,
    agentState: AgentState.DISCONNECTED,
    createdMs: nowMs,
    updatedMs: nowMs,
    prepareMs: 0,
    migrateMs: 0,
    error: "",
    balloonTargetBeforeBytes: 0,
    phases: [],
    balloonTimeline: [],
    migrateIssued: false,
    cleanups: [],
  };
}
