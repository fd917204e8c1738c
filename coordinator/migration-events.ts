/**
 * The migration event log, as types, and the pure fold that turns a
 * migration's events into its {@link MigrationRecord}. No I/O here: the
 * store (migration-store.ts) persists events and keeps the folded records.
 *
 * Rules of the fold:
 * - the first event of a migration is its `created` event; a later
 *   `created` is ignored;
 * - the first `final` event wins: a second `final` is ignored;
 * - `phase` events after the `final` are ignored, and so is a `phase`
 *   event naming a final phase (only a `final` event ends a migration);
 * - every other event still applies after the final (late destination
 *   stats, balloon readings, `cleanup` work);
 * - `updatedMs` is the `atMs` of the last event that was not ignored;
 * - the balloon timeline gets a point only when target or actual changed,
 *   and keeps the newest {@link MAX_TIMELINE_POINTS}.
 */
import { AgentState, Phase } from "../gen/ballast/v1/common_pb.js";
import { FINAL_PHASES, newRecord, type MigrateParams, type MigrationDirection, type MigrationRecord } from "./migration-record.js";
import type { MigrateStats } from "./qemu.js";

/** Balloon timeline points kept per record (the oldest go first). */
export const MAX_TIMELINE_POINTS = 2000;

export type { MigrationDirection };

/** A phase that ends a migration. */
export type FinalPhase = Phase.COMPLETED | Phase.FAILED | Phase.CANCELLED;

/** The migration exists; always its first event. */
export interface CreatedEvent {
  type: "created";
  atMs: number;
  id: string;
  direction: MigrationDirection;
  params: MigrateParams;
}

/** What the VM looked like when the migration began. */
export interface VmEvent {
  type: "vm";
  atMs: number;
  ramBytes: number;
  balloonTargetBeforeBytes: number;
}

/** A non-final phase was entered (final phases come as {@link FinalEvent}). */
export interface PhaseEvent {
  type: "phase";
  atMs: number;
  phase: Phase;
  pass: number;
}

/** Transfer counters from QEMU. */
export interface ProgressEvent {
  type: "progress";
  atMs: number;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
}

/** A balloon reading. */
export interface BalloonEvent {
  type: "balloon";
  atMs: number;
  targetBytes: number;
  actualBytes: number;
}

/** The guest agent's state as seen by the coordinator. */
export interface AgentEvent {
  type: "agent";
  atMs: number;
  agentState: AgentState;
}

/** QEMU accepted `migrate`: from here on QEMU has a migration that may need cancelling. */
export interface MigrateIssuedEvent {
  type: "migrate-issued";
  atMs: number;
}

/** Durations measured by the orchestrator; absent fields keep their value. */
export interface TimingEvent {
  type: "timing";
  atMs: number;
  prepareMs?: number;
  migrateMs?: number;
}

/** `query-migrate` numbers of one side, stored as plain JSON. */
export interface StatsEvent {
  type: "stats";
  atMs: number;
  side: "source" | "destination";
  stats: MigrateStats;
}

/** The migration is over. Only the first one counts. */
export interface FinalEvent {
  type: "final";
  atMs: number;
  phase: FinalPhase;
  error: string;
}

/** Work done after the end (balloon restored, QEMU migration cancelled after a restart). */
export interface CleanupEvent {
  type: "cleanup";
  atMs: number;
  action: string;
  ok: boolean;
  detail: string;
}

/** One entry of a migration's append-only log. */
export type MigrationEvent =
  | CreatedEvent
  | VmEvent
  | PhaseEvent
  | ProgressEvent
  | BalloonEvent
  | AgentEvent
  | MigrateIssuedEvent
  | TimingEvent
  | StatsEvent
  | FinalEvent
  | CleanupEvent;

/** The `type` tag of an event. */
export type MigrationEventType = MigrationEvent["type"];

/** Every event type, for checking what comes back from disk. */
export const EVENT_TYPES: ReadonlySet<string> = new Set<MigrationEventType>([
  "created",
  "vm",
  "phase",
  "progress",
  "balloon",
  "agent",
  "migrate-issued",
  "timing",
  "stats",
  "final",
  "cleanup",
]);

/** The record a `created` event starts. */
export function recordFromCreated(e: CreatedEvent): MigrationRecord {
  return newRecord(e.id, e.params, e.atMs, e.direction);
}

/**
 * Applies one event to a record. Pure: never mutates `record` (nor its
 * arrays); returns a new record when the event changes anything, and
 * `record` itself (same reference) when the event is ignored (see the rules
 * at the top of this file).
 */
export function applyEvent(record: MigrationRecord, event: MigrationEvent): MigrationRecord {
  const next = { ...record };
  return apply(next, event, false) ? next : record;
}

/**
 * Builds a record from a migration's events, oldest first. The first event
 * must be its `created` event (throws otherwise). Pure.
 */
export function foldRecord(events: readonly MigrationEvent[]): MigrationRecord {
  const first = events[0];
  if (!first || first.type !== "created") {
    throw new Error(`a migration's events must start with "created", got ${first ? JSON.stringify(first.type) : "no events"}`);
  }
  // The record and its arrays are fresh here, so the fold may push in place.
  const r = recordFromCreated(first);
  for (let i = 1; i < events.length; i++) apply(r, events[i] as MigrationEvent, true);
  return r;
}

/**
 * Applies one event to a record IN PLACE, arrays included; returns false
 * when the event is ignored (then `record` is untouched). Only for a fold
 * that owns the record and its arrays (a record from {@link recordFromCreated}
 * that nobody else has seen), where copying a 2000-point timeline per event
 * would cost; everything else uses {@link applyEvent}.
 */
export function applyEventInPlace(record: MigrationRecord, event: MigrationEvent): boolean {
  return apply(record, event, true);
}

/**
 * Applies `e` to `r` in place (top-level fields). Arrays are pushed in place
 * when `ownArrays`, else replaced by copies. Returns false when the event is
 * ignored (then `r` is untouched).
 */
function apply(r: MigrationRecord, e: MigrationEvent, ownArrays: boolean): boolean {
  const ended = FINAL_PHASES.has(r.phase);
  switch (e.type) {
    case "created":
      return false;
    case "vm":
      r.ramBytes = e.ramBytes;
      r.balloonTargetBeforeBytes = e.balloonTargetBeforeBytes;
      break;
    case "phase":
      if (ended || FINAL_PHASES.has(e.phase)) return false;
      r.phase = e.phase;
      r.pass = e.pass;
      r.phases = add(r.phases, { phase: e.phase, pass: e.pass, atMs: e.atMs }, ownArrays);
      break;
    case "progress":
      r.transferredBytes = e.transferredBytes;
      r.remainingBytes = e.remainingBytes;
      r.totalBytes = e.totalBytes;
      break;
    case "balloon": {
      r.balloonTargetBytes = e.targetBytes;
      r.balloonActualBytes = e.actualBytes;
      const last = r.balloonTimeline[r.balloonTimeline.length - 1];
      if (!last || last.actualBytes !== e.actualBytes || last.targetBytes !== e.targetBytes) {
        r.balloonTimeline = add(r.balloonTimeline, { atMs: e.atMs, actualBytes: e.actualBytes, targetBytes: e.targetBytes }, ownArrays);
        if (r.balloonTimeline.length > MAX_TIMELINE_POINTS) r.balloonTimeline.splice(0, r.balloonTimeline.length - MAX_TIMELINE_POINTS);
      }
      break;
    }
    case "agent":
      r.agentState = e.agentState;
      break;
    case "migrate-issued":
      r.migrateIssued = true;
      break;
    case "timing":
      if (e.prepareMs !== undefined) r.prepareMs = e.prepareMs;
      if (e.migrateMs !== undefined) r.migrateMs = e.migrateMs;
      break;
    case "stats":
      if (e.side === "source") r.sourceStats = e.stats;
      else r.destinationStats = e.stats;
      break;
    case "final":
      if (ended) return false;
      r.phase = e.phase;
      r.error = e.error;
      r.phases = add(r.phases, { phase: e.phase, pass: r.pass, atMs: e.atMs }, ownArrays);
      break;
    case "cleanup":
      r.cleanups = add(r.cleanups, { atMs: e.atMs, action: e.action, ok: e.ok, detail: e.detail }, ownArrays);
      break;
    default: {
      const never: never = e;
      throw new Error(`unknown migration event ${JSON.stringify((never as { type?: unknown }).type)}`);
    }
  }
  r.updatedMs = e.atMs;
  return true;
}

function add<T>(list: T[], item: T, inPlace: boolean): T[] {
  if (inPlace) {
    list.push(item);
    return list;
  }
  return [...list, item];
}
