/**
 * The agent's runtime state machine, pure: every input (a coordinator
 * message or a sample tick) maps (state, input) to (new state, effects). The
 * session performs the effects in order; nothing here does I/O.
 *
 *   steady ──PREPARE──▶ migrating ──POSTCOPY_ACTIVE──▶ postcopy
 *     ▲                    │ PRECOPY_PASS/SWITCHOVER: hold   │
 *     └──COMPLETED/FAILED/CANCELLED (restore)◀───────────────┘
 *
 * In every phase: an incomplete sample never shrinks the guest, pressure
 * grows it at once, and no target leaves [floor, max].
 *
 * PREPARE: reclaim clean page cache → balloon request → PhaseAck, at once.
 */
import { Phase } from "../gen/ballast/v1/common_pb.js";
import {
  DEFAULT_POLICY_OPTIONS,
  assessPressure,
  estimateMemory,
  freshTracker,
  postcopyDecision,
  prepareDecision,
  prepareReclaimBytes,
  resolveBounds,
  restoreDecision,
  steadyDecision,
  type Bounds,
  type Decision,
  type DecisionReason,
  type MemoryEstimate,
  type PolicyOptions,
  type Pressure,
  type SteadyTracker,
} from "./policy.js";
import type { Sample } from "./sample.js";

/** Where the agent is in a migration's life. */
export type AgentPhase = "steady" | "migrating" | "postcopy";

/** A PhaseEvent in domain units. */
export interface PhaseSignal {
  migrationId: string;
  phase: Phase;
  pass: number;
  /** Unix ms; undefined or 0 when the coordinator set none. */
  deadlineUnixMs?: number;
  error?: string;
}

/** The coordinator's Policy in domain units; 0 means "not set" for every field. */
export interface CoordinatorPolicy {
  floorBytes: number;
  maxBytes: number;
  sampleIntervalMs: number;
  steadyState: boolean;
}

/** The coordinator's BalloonState in domain units; 0 means unknown. */
export interface CoordinatorBalloon {
  targetBytes: number;
  actualBytes: number;
  ramBytes: number;
}

/** Everything the state machine remembers. */
export interface RuntimeState {
  phase: AgentPhase;
  /** The migration in progress, "" when none. */
  migrationId: string;
  policy?: CoordinatorPolicy;
  balloon?: CoordinatorBalloon;
  /** The target in force: our last request or the coordinator's last BalloonState, whichever is newer. */
  currentTargetBytes?: number;
  /** The target in force when PREPARE arrived, restored afterwards. */
  targetBeforePrepareBytes?: number;
  tracker: SteadyTracker;
  /** The previous tick's sample, for rates. */
  prev?: Sample;
  /** The last sample reported to the coordinator (this attach); undefined: report the next one. */
  reported?: ReportedSample;
}

/** What {@link reportDue} compares a new sample with. */
export interface ReportedSample {
  monotonicMs: number;
  memAvailableBytes: number;
}

/** Options of the state machine. */
export interface RuntimeOptions {
  /** Policy tuning. Default {@link DEFAULT_POLICY_OPTIONS}. */
  policy: PolicyOptions;
  /** Sample interval until the coordinator's Policy sets one. Default 1000 ms. */
  sampleIntervalMs: number;
  /** Sample interval during post-copy, to deflate on demand quickly. Default 200 ms. */
  fastSampleIntervalMs: number;
  /** Reclaim clean page cache before a PREPARE inflation. Default true. */
  dropCaches: boolean;
  /** Upper bound on the time spent reclaiming before PREPARE's balloon request. Default 3000 ms (the rig's drop took 0.4–0.7 s). */
  maxReclaimMs: number;
  /** The reclaim must end this long before the PREPARE deadline, leaving time for the request and the ack. Default 500 ms. */
  reclaimMarginMs: number;
  /**
   * The agent decides on every sample but reports samples to the coordinator
   * (which shows them, nothing more) only this often in steady state, or at
   * once when something changed (see {@link reportDue}). Default 5000 ms:
   * sending a sample cost about as much CPU as taking it. 0 reports every sample.
   */
  reportEveryMs: number;
  /**
   * A MemAvailable move larger than max(this, reportMemAvailableDeltaFraction
   * × MemTotal) since the last report is reported at once. Default 32 MiB.
   */
  reportMemAvailableDeltaBytes: number;
  /**
   * See reportMemAvailableDeltaBytes. Default 0.02: 32 MiB binds up to a
   * 1.6 GiB guest; on a 24 GiB machine MemAvailable moved 30–100 MiB from one
   * second to the next with nothing of note going on.
   */
  reportMemAvailableDeltaFraction: number;
}

/** The defaults, with the reasons given on {@link RuntimeOptions}. */
export const DEFAULT_RUNTIME_OPTIONS: Readonly<RuntimeOptions> = Object.freeze({
  policy: DEFAULT_POLICY_OPTIONS,
  sampleIntervalMs: 1000,
  fastSampleIntervalMs: 200,
  dropCaches: true,
  maxReclaimMs: 3000,
  reclaimMarginMs: 500,
  reportEveryMs: 5000,
  reportMemAvailableDeltaBytes: 32 * 1024 * 1024,
  reportMemAvailableDeltaFraction: 0.02,
});

/** Something the session must do, in order. */
export type Effect =
  | { kind: "report"; sample: Sample; estimate?: MemoryEstimate; why: string }
  | { kind: "reclaim"; bytes: number; budgetMs: number }
  | { kind: "balloon"; targetBytes: number; reason: DecisionReason; detail: string; migrationId: string }
  | { kind: "ack"; migrationId: string; phase: Phase; targetBytes: number }
  | { kind: "log"; level: "debug" | "info" | "warn"; msg: string; data?: Record<string, unknown> };

/** A transition's result. */
export interface Step {
  state: RuntimeState;
  effects: Effect[];
}

/** The state at agent start: steady, nothing known. */
export function initialState(): RuntimeState {
  return { phase: "steady", migrationId: "", tracker: freshTracker() };
}

/** How long to wait before the next sample. */
export function sampleIntervalMs(state: RuntimeState, options: RuntimeOptions = DEFAULT_RUNTIME_OPTIONS): number {
  if (state.phase === "postcopy") return options.fastSampleIntervalMs;
  const fromPolicy = state.policy?.sampleIntervalMs ?? 0;
  return fromPolicy > 0 ? fromPolicy : options.sampleIntervalMs;
}

/** Records the coordinator's Policy. */
export function onPolicy(state: RuntimeState, policy: CoordinatorPolicy): RuntimeState {
  return { ...state, policy };
}

/** Records the coordinator's BalloonState; its target becomes the target in force. */
export function onBalloonState(state: RuntimeState, balloon: CoordinatorBalloon): RuntimeState {
  const next: RuntimeState = { ...state, balloon };
  const inForce = balloon.targetBytes > 0 ? balloon.targetBytes : balloon.actualBytes;
  if (inForce > 0) next.currentTargetBytes = inForce;
  return next;
}

interface View {
  /** Neither RAM nor a target is known (no sample, no BalloonState): any target would be a guess. */
  blind: boolean;
  estimate?: MemoryEstimate;
  pressure?: Pressure;
  bounds: Bounds;
  current: number;
}

function view(state: RuntimeState, sample: Sample | undefined, options: RuntimeOptions): View {
  const ctx = { ramBytes: state.balloon?.ramBytes ?? 0, actualBytes: state.balloon?.actualBytes ?? 0 };
  const estimate = sample ? estimateMemory(sample, ctx, options.policy) : undefined;
  // Without a sample, RAM is whatever the coordinator said; failing that, the last request keeps us bounded.
  const ram = estimate?.ramBytes ?? (ctx.ramBytes > 0 ? ctx.ramBytes : (state.currentTargetBytes ?? 0));
  const bounds = resolveBounds(state.policy, ram, options.policy);
  const out: View = { blind: ram <= 0, bounds, current: state.currentTargetBytes ?? bounds.maxBytes };
  if (estimate) out.estimate = estimate;
  if (sample) out.pressure = assessPressure(sample, state.prev, options.policy);
  return out;
}

function request(state: RuntimeState, decision: Decision, migrationId: string, effects: Effect[]): RuntimeState {
  if (decision.targetBytes === undefined) return state;
  effects.push({ kind: "balloon", targetBytes: decision.targetBytes, reason: decision.reason, detail: decision.detail, migrationId });
  return { ...state, currentTargetBytes: decision.targetBytes };
}

/**
 * A sample tick (or a failed sample: `sample` undefined). Pressure grows the
 * guest in every phase; steady state self-balloons only when the Policy says
 * so; migrating holds; post-copy deflates on demand.
 */
export function onTick(state: RuntimeState, sample: Sample | undefined, options: RuntimeOptions = DEFAULT_RUNTIME_OPTIONS): Step {
  const v = view(state, sample, options);
  const step = decideTick(state, sample, v, options);
  if (!sample || !v.pressure) return step;
  const why = reportDue(
    state.reported,
    sample,
    { phase: state.phase, underPressure: v.pressure.under, requests: step.effects.some((e) => e.kind === "balloon"), intervalMs: sampleIntervalMs(state, options) },
    options,
  );
  if (why === undefined) return step;
  const report: Effect = { kind: "report", sample, why };
  if (v.estimate) report.estimate = v.estimate;
  // The sample goes first: it explains a balloon request that follows.
  return {
    state: { ...step.state, reported: { monotonicMs: sample.monotonicMs, memAvailableBytes: sample.meminfo.memAvailable } },
    effects: [report, ...step.effects],
  };
}

/** What {@link reportDue} needs besides the two samples. */
export interface ReportContext {
  phase: AgentPhase;
  underPressure: boolean;
  /** The tick sends a balloon request. */
  requests: boolean;
  /** The sampling interval in force. */
  intervalMs: number;
}

/**
 * Whether a sample goes to the coordinator, and why (undefined: not now).
 * Reported: the first sample of an attach; during a migration every sample;
 * under pressure; with a balloon request; when MemAvailable moved by more
 * than max(`reportMemAvailableDeltaBytes`, `reportMemAvailableDeltaFraction`
 * × MemTotal); and otherwise every `reportEveryMs` (within half an
 * interval, so timer jitter does not skip a period).
 */
export function reportDue(last: ReportedSample | undefined, sample: Sample, ctx: ReportContext, options: RuntimeOptions = DEFAULT_RUNTIME_OPTIONS): string | undefined {
  if (!last) return "first sample";
  if (ctx.phase !== "steady") return ctx.phase;
  if (ctx.underPressure) return "pressure";
  if (ctx.requests) return "balloon request";
  const moved = Math.max(options.reportMemAvailableDeltaBytes, options.reportMemAvailableDeltaFraction * sample.meminfo.memTotal);
  if (Math.abs(sample.meminfo.memAvailable - last.memAvailableBytes) > moved) return "MemAvailable moved";
  if (sample.monotonicMs - last.monotonicMs + ctx.intervalMs / 2 >= options.reportEveryMs) return "period";
  return undefined;
}

function decideTick(state: RuntimeState, sample: Sample | undefined, v: View, options: RuntimeOptions): Step {
  const effects: Effect[] = [];
  if (!sample || !v.pressure) {
    // A gap breaks "held for several samples": start counting again.
    return { state: { ...state, tracker: freshTracker(state.tracker.lastPressureMs) }, effects };
  }
  let next: RuntimeState = { ...state, prev: sample };
  if (state.phase === "steady") {
    const steadyOn = state.policy?.steadyState ?? false;
    const { decision, tracker } = steadyDecision(
      { currentBytes: v.current, estimate: v.estimate, pressure: v.pressure, tracker: state.tracker, nowMs: sample.monotonicMs },
      v.bounds,
      options.policy,
    );
    next = { ...next, tracker };
    // With steady state off only the pressure rule may act.
    if (steadyOn || decision.reason === "demand") {
      if (decision.targetBytes !== undefined && decision.reason === "demand") {
        effects.push({ kind: "log", level: "warn", msg: "memory pressure: growing", data: { reasons: v.pressure.reasons } });
      }
      next = request(next, decision, "", effects);
    }
    return { state: next, effects };
  }
  // migrating or postcopy: never shrink, grow on pressure.
  const decision = postcopyDecision(v.current, v.pressure, v.bounds, options.policy);
  if (decision.targetBytes !== undefined) {
    effects.push({ kind: "log", level: "warn", msg: `memory pressure during ${state.phase}: growing`, data: { reasons: v.pressure.reasons } });
    next = { ...request(next, decision, state.migrationId, effects), tracker: freshTracker(sample.monotonicMs) };
  }
  return { state: next, effects };
}

/**
 * A phase event from the coordinator. `sample` is a fresh reading (undefined
 * if it failed); `nowUnixMs` is used against the PREPARE deadline.
 */
export function onPhaseEvent(
  state: RuntimeState,
  event: PhaseSignal,
  sample: Sample | undefined,
  nowUnixMs: number,
  options: RuntimeOptions = DEFAULT_RUNTIME_OPTIONS,
): Step {
  const effects: Effect[] = [];
  const v = view(state, sample, options);
  switch (event.phase) {
    case Phase.PREPARE: {
      // A PREPARE seen again (a re-attach to the same host): answer it, but do not reclaim twice.
      const repeat = state.phase !== "steady" && state.migrationId === event.migrationId;
      let next: RuntimeState = { ...state, phase: "migrating", migrationId: event.migrationId };
      if (state.phase === "steady") next = withBefore(next, state.currentTargetBytes);
      if (!v.estimate || !v.pressure) {
        // Answer with the target in force, so the coordinator migrates now instead of waiting out its deadline.
        const known = state.currentTargetBytes;
        effects.push({ kind: "log", level: "warn", msg: "PREPARE with an incomplete sample: giving nothing back" });
        if (known !== undefined) next = request(next, { targetBytes: known, reason: "prepare", detail: "incomplete sample: keep the current target" }, event.migrationId, effects);
        effects.push({ kind: "ack", migrationId: event.migrationId, phase: event.phase, targetBytes: known ?? 0 });
        return { state: next, effects };
      }
      const decision = prepareDecision(v.estimate, v.pressure, v.current, v.bounds, options.policy);
      const target = decision.targetBytes ?? v.current;
      if (options.dropCaches && !v.pressure.under && !repeat && sample) {
        const bytes = prepareReclaimBytes(v.estimate, sample, v.current, target);
        const deadline = event.deadlineUnixMs && event.deadlineUnixMs > 0 ? event.deadlineUnixMs : Number.POSITIVE_INFINITY;
        const budgetMs = Math.min(options.maxReclaimMs, deadline - nowUnixMs - options.reclaimMarginMs);
        if (bytes > 0 && budgetMs > 0) effects.push({ kind: "reclaim", bytes, budgetMs: Math.floor(budgetMs) });
        else if (bytes > 0) effects.push({ kind: "log", level: "info", msg: "PREPARE deadline too close to reclaim first", data: { bytes } });
      }
      next = request(next, decision, event.migrationId, effects);
      // The ack follows the request at once: the coordinator watches the inflation itself.
      effects.push({ kind: "ack", migrationId: event.migrationId, phase: event.phase, targetBytes: target });
      return { state: next, effects };
    }
    case Phase.PRECOPY_PASS:
    case Phase.SWITCHOVER: {
      let next: RuntimeState = { ...state, phase: state.phase === "postcopy" ? "postcopy" : "migrating", migrationId: event.migrationId };
      if (state.phase === "steady") next = withBefore(next, state.currentTargetBytes);
      effects.push({ kind: "ack", migrationId: event.migrationId, phase: event.phase, targetBytes: 0 });
      return { state: next, effects };
    }
    case Phase.POSTCOPY_ACTIVE: {
      let next: RuntimeState = { ...state, phase: "postcopy", migrationId: event.migrationId };
      if (state.phase === "steady") next = withBefore(next, state.currentTargetBytes);
      // The guest may already be short of memory on arrival: check now, not one interval later.
      const decision = postcopyDecision(v.current, v.pressure, v.bounds, options.policy);
      next = request(next, decision, event.migrationId, effects);
      effects.push({ kind: "ack", migrationId: event.migrationId, phase: event.phase, targetBytes: decision.targetBytes ?? 0 });
      return { state: next, effects };
    }
    case Phase.COMPLETED:
    case Phase.FAILED:
    case Phase.CANCELLED: {
      const { state: next, targetBytes } = restore(state, v, event.migrationId, effects, options);
      effects.push({ kind: "ack", migrationId: event.migrationId, phase: event.phase, targetBytes });
      return { state: next, effects };
    }
    default:
      effects.push({ kind: "log", level: "debug", msg: "ignoring phase event", data: { phase: event.phase } });
      return { state, effects };
  }
}

/**
 * A Welcome after (re-)attaching. The coordinator's current phase, if any, is
 * handled as a phase event: after a live migration this is how the agent
 * learns it now runs on the destination in post-copy. If the coordinator
 * knows of no migration but the agent was in one, the migration ended while
 * the agent was cut off: restore (growing is the safe direction).
 */
export function onWelcome(
  state: RuntimeState,
  currentPhase: PhaseSignal | undefined,
  sample: Sample | undefined,
  nowUnixMs: number,
  options: RuntimeOptions = DEFAULT_RUNTIME_OPTIONS,
): Step {
  // A new session: its coordinator has no sample yet.
  state = { ...state };
  delete state.reported;
  if (currentPhase && currentPhase.phase !== Phase.UNSPECIFIED) return onPhaseEvent(state, currentPhase, sample, nowUnixMs, options);
  if (state.phase === "steady") return { state, effects: [] };
  const effects: Effect[] = [{ kind: "log", level: "info", msg: "coordinator knows no migration: restoring", data: { migrationId: state.migrationId } }];
  const { state: next } = restore(state, view(state, sample, options), state.migrationId, effects, options);
  return { state: next, effects };
}

function restore(state: RuntimeState, v: View, migrationId: string, effects: Effect[], options: RuntimeOptions): { state: RuntimeState; targetBytes: number } {
  const reset: RuntimeState = { ...state, phase: "steady", migrationId: "", tracker: freshTracker(state.tracker.lastPressureMs) };
  delete reset.targetBeforePrepareBytes;
  // Knowing nothing, "restore" could name a target below what the guest has: ask for nothing.
  if (v.blind) return { state: reset, targetBytes: 0 };
  const input: Parameters<typeof restoreDecision>[0] = { currentBytes: v.current, steadyState: state.policy?.steadyState ?? false };
  if (v.estimate) input.estimate = v.estimate;
  if (state.targetBeforePrepareBytes !== undefined) input.targetBeforePrepareBytes = state.targetBeforePrepareBytes;
  const decision = restoreDecision(input, v.bounds, options.policy);
  const next = request(reset, decision, migrationId, effects);
  return { state: next, targetBytes: decision.targetBytes ?? 0 };
}

function withBefore(state: RuntimeState, before: number | undefined): RuntimeState {
  if (before === undefined) return state;
  return { ...state, targetBeforePrepareBytes: before };
}
