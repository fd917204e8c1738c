/**
 * The migration machine: a pure function `(state, event) → (state, effects)`
 * for one migration, outgoing or incoming, pre-copy, post-copy or hybrid,
 * including PREPARE, cancel, failure, loss of the hypervisor connection and
 * resuming after a coordinator restart. It does no I/O and reads no clock:
 * the VM's supervisor (coordinator/vm-supervisor.ts) runs the effects and
 * feeds their outcomes back as events, with the time in each event.
 *
 * Safety rules it encodes:
 * - the balloon never fails a migration: PREPARE ends at its deadline;
 * - every way out other than COMPLETED on the source restores the balloon;
 * - a lost hypervisor connection fails the migration after `lossMs`, never
 *   later, and leaves a cleanup (cancel QEMU's migration, restore the
 *   balloon) for when the connection returns;
 * - cancel always answers: it is refused with a reason in post-copy (the
 *   guest already runs on the destination) and after the end.
 */
import { BalloonStrategy, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { FINAL_STATUSES } from "./hypervisor.js";

/** Where the machine is. */
export type Step =
  /** Outgoing: waiting for the VM's run state and balloon. */
  | "check"
  /** Outgoing: waiting for the destination's PrepareIncoming. */
  | "destination"
  /** Outgoing: waiting for capabilities and parameters to be set. */
  | "configure"
  /** Outgoing: PREPARE, waiting for the agent's target and the inflation, bounded by the deadline. */
  | "prepare"
  /** Outgoing: `migrate` sent, not yet accepted. */
  | "migrate"
  /** QEMU is migrating (either direction). */
  | "running"
  /** Outgoing: `migrate_cancel` sent, waiting for QEMU's final status. */
  | "cancelling"
  /** Restarted coordinator: waiting for the hypervisor to say what happened meanwhile. */
  | "resume"
  /** The outcome is known; collecting the final numbers. */
  | "stats"
  /** The outcome is known; putting the balloon back. */
  | "restore"
  /** Finished. */
  | "done";

/** Parameters the machine needs (a subset of the migration record's). */
export interface MachineParams {
  id: string;
  direction: "outgoing" | "incoming";
  mode: MigrationMode;
  strategy: BalloonStrategy;
  prepareDeadlineMs: number;
  postcopyAfterPasses: number;
}

/** Timing knobs, with their defaults in {@link DEFAULT_TIMING}. */
export interface MachineTiming {
  /** How long the hypervisor may be unreachable mid-migration before the migration fails. */
  lossMs: number;
  /** query-migrate polling interval while running. */
  pollMs: number;
  /** Longest wait for QEMU to confirm a cancel before the machine ends it anyway. */
  cancelWaitMs: number;
  /** While post-copy is paused by a broken stream, how often the source tries to recover it. */
  recoverEveryMs: number;
}

/** Defaults: lossMs 5000, pollMs 500, cancelWaitMs 10000, recoverEveryMs 2000. */
export const DEFAULT_TIMING: MachineTiming = { lossMs: 5000, pollMs: 500, cancelWaitMs: 10_000, recoverEveryMs: 2000 };

/** The machine's state. Plain data, so a test can build and compare it. */
export interface MachineState {
  params: MachineParams;
  timing: MachineTiming;
  step: Step;
  /** The phase last announced (to the record and the agent). */
  phase: Phase;
  pass: number;
  /** QEMU accepted `migrate` (outgoing) or `migrate-incoming` (incoming). */
  migrateIssued: boolean;
  postcopyRequested: boolean;
  cancelRequested: boolean;
  /** The balloon target before the migration; 0 when unknown (nothing to restore). */
  balloonBeforeBytes: number;
  /** Where to send, once the destination answered. */
  uri: string;
  prepareStartedAt: number;
  prepareDeadlineAt: number;
  /** PREPARE inflation done (reached, stalled or gave up). */
  balloonSettled: boolean;
  /** An accepted PREPARE target arrived from the agent. */
  prepareRequested: boolean;
  migrateStartedAt: number;
  /** QEMU has reported this migration under way (active, device, post-copy) at least once. */
  seenActive: boolean;
  /** Post-copy is paused: the stream broke (QEMU `postcopy-paused`); the guest is frozen until it is recovered. */
  paused: boolean;
  /** When the source last asked for a recovery; 0: never. */
  lastRecoverAt: number;
  /** Since when the hypervisor is unreachable; null while connected. */
  lostSince: number | null;
  lastPollAt: number;
  cancelSentAt: number;
  /** The decided outcome, once known. */
  outcome: { phase: Phase.COMPLETED | Phase.FAILED | Phase.CANCELLED; error: string } | undefined;
}

/** What happens to a machine. Every event carries the time it happened (Unix ms). */
export type MachineEvent =
  | { type: "begin"; now: number }
  | { type: "vm-checked"; now: number; runState: string; balloonTargetBytes: number; agentAttached: boolean }
  | { type: "destination-ready"; now: number; uri: string }
  | { type: "configured"; now: number }
  | { type: "prepare-requested"; now: number }
  /** The agent acked PREPARE with nothing to give back (e.g. under memory pressure). */
  | { type: "prepare-declined"; now: number }
  | { type: "balloon-settled"; now: number }
  | { type: "agent-detached"; now: number }
  | { type: "migrate-accepted"; now: number }
  | { type: "status"; now: number; status: string }
  | { type: "pass"; now: number; pass: number }
  | { type: "guest-stopped"; now: number }
  | { type: "hypervisor-down"; now: number; error: string }
  | { type: "hypervisor-up"; now: number }
  | { type: "cancel"; now: number }
  | { type: "failed"; now: number; error: string }
  | { type: "stats-done"; now: number }
  | { type: "restored"; now: number }
  | { type: "tick"; now: number };

/** What the machine asks its driver to do. */
export type Effect =
  | { type: "check-vm" }
  | { type: "prepare-destination" }
  | { type: "configure" }
  | { type: "phase"; phase: Phase; pass: number; deadlineUnixMs: number }
  | { type: "wait-balloon"; untilMs: number }
  | { type: "migrate"; uri: string }
  | { type: "start-postcopy" }
  | { type: "cancel-qemu" }
  | { type: "poll" }
  | { type: "query-status" }
  | { type: "migrate-issued" }
  | { type: "timing"; prepareMs?: number; migrateMs?: number }
  | { type: "collect-stats" }
  | { type: "restore-balloon"; targetBytes: number }
  | { type: "final"; phase: Phase.COMPLETED | Phase.FAILED | Phase.CANCELLED; error: string }
  /** Post-copy paused (entered true) or running again (false): the record says so. */
  | { type: "paused"; paused: boolean }
  /** Source: ask the destination to listen again, then resume the stream there. */
  | { type: "recover" }
  /** Work for when the hypervisor is back: the machine has ended without it. */
  | { type: "cleanup-later"; cancelQemu: boolean; restoreBalloonBytes: number };

/** The result of one step. */
export interface Transition {
  state: MachineState;
  effects: Effect[];
}

/** A new outgoing machine; send it `begin`. */
export function outgoing(params: Omit<MachineParams, "direction">, timing: MachineTiming = DEFAULT_TIMING): MachineState {
  return base({ ...params, direction: "outgoing" }, timing, "check");
}

/** A new incoming machine whose `migrate-incoming` was accepted. */
export function incoming(params: Omit<MachineParams, "direction">, now: number, timing: MachineTiming = DEFAULT_TIMING): MachineState {
  return { ...base({ ...params, direction: "incoming" }, timing, "running"), migrateIssued: true, phase: Phase.PRECOPY_PASS, lastPollAt: now };
}

/**
 * A machine rebuilt after a coordinator restart from what the record says.
 * It waits for the hypervisor and then learns from QEMU what happened.
 */
export function resumed(
  params: MachineParams,
  record: { phase: Phase; pass: number; migrateIssued: boolean; balloonBeforeBytes: number },
  now: number,
  timing: MachineTiming = DEFAULT_TIMING,
): MachineState {
  return {
    ...base(params, timing, "resume"),
    phase: record.phase,
    pass: record.pass,
    migrateIssued: record.migrateIssued,
    balloonBeforeBytes: record.balloonBeforeBytes,
    // Counted as lost from the restart on: a VM whose QEMU never comes back fails after lossMs.
    lostSince: now,
  };
}

function base(params: MachineParams, timing: MachineTiming, step: Step): MachineState {
  return {
    params,
    timing,
    step,
    phase: Phase.UNSPECIFIED,
    pass: 0,
    migrateIssued: false,
    postcopyRequested: false,
    cancelRequested: false,
    balloonBeforeBytes: 0,
    uri: "",
    prepareStartedAt: 0,
    prepareDeadlineAt: 0,
    balloonSettled: false,
    prepareRequested: false,
    migrateStartedAt: 0,
    seenActive: false,
    paused: false,
    lastRecoverAt: 0,
    lostSince: null,
    lastPollAt: 0,
    cancelSentAt: 0,
    outcome: undefined,
  };
}

/** Whether the machine has finished. */
export function isDone(s: MachineState): boolean {
  return s.step === "done";
}

/**
 * Whether a cancel would be accepted now, and if not why. Cancel is refused
 * once the guest runs on the destination (post-copy) and after the end.
 */
export function cancelVerdict(s: MachineState): { ok: true } | { ok: false; why: string } {
  if (s.outcome || s.step === "done" || s.step === "stats" || s.step === "restore") {
    return { ok: false, why: `migration ${s.params.id} is already over` };
  }
  if (s.params.direction === "incoming") return { ok: false, why: "an incoming migration is cancelled on its source host" };
  if (s.phase === Phase.POSTCOPY_ACTIVE || s.postcopyRequested) {
    return {
      ok: false,
      why: "the migration is in post-copy: the guest already runs on the destination, and cancelling would lose it; wait for it to complete",
    };
  }
  if (s.cancelRequested) return { ok: true };
  return { ok: true };
}

const postcopyMode = (s: MachineState) => s.params.mode === MigrationMode.POSTCOPY || s.params.mode === MigrationMode.HYBRID;

/** One step of the machine. Events that do not apply in the current step change nothing. */
export function step(state: MachineState, ev: MachineEvent): Transition {
  const s: MachineState = { ...state };
  const fx: Effect[] = [];
  if (s.step === "done") return { state: s, effects: fx };

  // ---- events that mean the same in every step -------------------------------
  switch (ev.type) {
    case "cancel":
      return onCancel(s, fx, ev.now);
    case "failed":
      if (s.outcome) {
        // Failures while collecting stats or restoring do not change the outcome.
        return advanceAfterOutcome(s, fx, ev.type === "failed" && s.step === "stats" ? "stats-done" : "restored", ev.now);
      }
      return fail(s, fx, ev.error, ev.now);
    case "hypervisor-down":
      if (s.lostSince === null) s.lostSince = ev.now;
      return { state: s, effects: fx };
    case "hypervisor-up":
      s.lostSince = null;
      // Events may have been lost while down: ask QEMU where it is.
      if (s.step === "running" || s.step === "cancelling" || s.step === "migrate" || s.step === "resume") fx.push({ type: "query-status" });
      return { state: s, effects: fx };
    case "tick":
      return onTick(s, fx, ev.now);
    default:
      break;
  }

  switch (s.step) {
    case "check":
      if (ev.type === "begin") fx.push({ type: "check-vm" });
      else if (ev.type === "vm-checked") {
        if (ev.runState !== "running") return fail(s, fx, `the VM is ${ev.runState}, not running`, ev.now);
        s.balloonBeforeBytes = ev.balloonTargetBytes;
        s.step = "destination";
        fx.push({ type: "prepare-destination" });
      }
      break;
    case "destination":
      if (ev.type === "destination-ready") {
        s.uri = ev.uri;
        s.step = "configure";
        fx.push({ type: "configure" });
      }
      break;
    case "configure":
      if (ev.type === "configured") {
        const wantsPrepare = s.params.strategy === BalloonStrategy.INFLATE_THEN_MIGRATE || s.params.strategy === BalloonStrategy.OVERLAP;
        if (!wantsPrepare) return issueMigrate(s, fx, ev.now);
        s.step = "prepare";
        s.prepareStartedAt = ev.now;
        s.prepareDeadlineAt = ev.now + s.params.prepareDeadlineMs;
        setPhase(s, fx, Phase.PREPARE, 0);
        // Overlap: the agent's request is applied whenever it comes; migrate at once.
        if (s.params.strategy === BalloonStrategy.OVERLAP) return issueMigrate(s, fx, ev.now);
      }
      break;
    case "prepare":
      if (ev.type === "prepare-requested" && !s.prepareRequested) {
        s.prepareRequested = true;
        fx.push({ type: "wait-balloon", untilMs: s.prepareDeadlineAt });
      } else if (ev.type === "balloon-settled" && s.prepareRequested) {
        s.balloonSettled = true;
        return issueMigrate(s, fx, ev.now);
      } else if ((ev.type === "agent-detached" || ev.type === "prepare-declined") && !s.prepareRequested) {
        // The agent is gone, or said it has nothing to give, before it asked for anything: nothing to wait for.
        return issueMigrate(s, fx, ev.now);
      }
      break;
    case "migrate":
      if (ev.type === "migrate-accepted") {
        s.migrateIssued = true;
        s.step = "running";
        s.lastPollAt = ev.now;
        fx.push({ type: "migrate-issued" });
        if (s.cancelRequested) return sendCancel(s, fx, ev.now);
      } else if (ev.type === "status") {
        onStatus(s, fx, ev.status, ev.now);
      }
      break;
    case "running":
    case "cancelling":
    case "resume":
      if (ev.type === "status") return onStatus(s, fx, ev.status, ev.now);
      if (ev.type === "pass") {
        if (s.params.direction === "outgoing" && (s.phase === Phase.PRECOPY_PASS || s.phase === Phase.PREPARE || s.phase === Phase.UNSPECIFIED)) {
          setPhase(s, fx, Phase.PRECOPY_PASS, ev.pass);
        } else if (s.phase === Phase.PRECOPY_PASS) s.pass = ev.pass;
        if (s.params.mode === MigrationMode.HYBRID && ev.pass > s.params.postcopyAfterPasses) requestPostcopy(s, fx);
      } else if (ev.type === "guest-stopped" && s.params.direction === "outgoing" && s.phase === Phase.PRECOPY_PASS && s.step === "running") {
        setPhase(s, fx, Phase.SWITCHOVER, s.pass);
      }
      break;
    case "stats":
      if (ev.type === "stats-done") return advanceAfterOutcome(s, fx, "stats-done", ev.now);
      break;
    case "restore":
      if (ev.type === "restored") return advanceAfterOutcome(s, fx, "restored", ev.now);
      break;
  }
  return { state: s, effects: fx };
}

function setPhase(s: MachineState, fx: Effect[], phase: Phase, pass: number): void {
  if (s.phase === phase && s.pass === pass) return;
  s.phase = phase;
  s.pass = pass;
  fx.push({ type: "phase", phase, pass, deadlineUnixMs: phase === Phase.PREPARE ? s.prepareDeadlineAt : 0 });
}

function issueMigrate(s: MachineState, fx: Effect[], now: number): Transition {
  if (s.step === "prepare" || s.prepareStartedAt > 0) fx.push({ type: "timing", prepareMs: now - s.prepareStartedAt });
  s.step = "migrate";
  s.migrateStartedAt = now;
  fx.push({ type: "migrate", uri: s.uri });
  return { state: s, effects: fx };
}

function requestPostcopy(s: MachineState, fx: Effect[]): void {
  if (s.postcopyRequested || s.cancelRequested || s.params.direction !== "outgoing") return;
  s.postcopyRequested = true;
  fx.push({ type: "start-postcopy" });
}

function onStatus(s: MachineState, fx: Effect[], status: string, now: number): Transition {
  s.lastPollAt = now;
  const out = s.params.direction === "outgoing";
  if (FINAL_STATUSES.has(status)) {
    // A final status before our `migrate` was accepted belongs to an older migration of this QEMU
    // (e.g. the incoming one that brought the guest here).
    if (s.step === "migrate" && !s.seenActive) return { state: s, effects: fx };
    if (s.step === "resume" && !s.migrateIssued) {
      return decide(s, fx, Phase.FAILED, "interrupted: the coordinator restarted before the migration started in QEMU", now);
    }
    // QEMU ended it itself: nothing to cancel there.
    if (status === "completed") return decide(s, fx, Phase.COMPLETED, "", now, true);
    if (status === "cancelled" || s.cancelRequested) return decide(s, fx, Phase.CANCELLED, s.cancelRequested ? "cancelled by request" : "cancelled in QEMU", now, true);
    return decide(s, fx, Phase.FAILED, `QEMU reports the migration ${status}`, now, true);
  }
  if (status === "none") {
    // QEMU has no migration at all: it never started one (a restart before `migrate`) or was itself restarted.
    if (s.step === "resume") {
      const why = s.migrateIssued
        ? "interrupted: after the coordinator restarted, QEMU reports no migration"
        : "interrupted: the coordinator restarted before the migration started in QEMU";
      return decide(s, fx, Phase.FAILED, why, now, true);
    }
    if (s.step === "migrate") return { state: s, effects: fx };
    // A destination reports no status until the source connects.
    if (!out && !s.seenActive) return { state: s, effects: fx };
    return decide(s, fx, Phase.FAILED, "QEMU has no migration any more: it was restarted mid-migration", now, true);
  }
  if (status !== "setup") s.seenActive = true;
  if (s.step === "resume") {
    // A migration is under way in QEMU: track it to its end.
    s.step = "running";
    s.migrateIssued = true;
    if (out && (s.phase === Phase.PREPARE || s.phase === Phase.UNSPECIFIED)) setPhase(s, fx, Phase.PRECOPY_PASS, Math.max(1, s.pass));
  }
  if (status === "postcopy-active" || status === "postcopy-paused" || status === "postcopy-recover") {
    setPhase(s, fx, Phase.POSTCOPY_ACTIVE, s.pass);
    if (status === "postcopy-paused" && !s.paused) {
      s.paused = true;
      fx.push({ type: "paused", paused: true });
      if (out) {
        s.lastRecoverAt = now;
        fx.push({ type: "recover" });
      }
    } else if (status === "postcopy-active" && s.paused) {
      s.paused = false;
      fx.push({ type: "paused", paused: false });
    }
  } else if (status === "active" && out) {
    if (s.phase !== Phase.PRECOPY_PASS && s.phase !== Phase.SWITCHOVER) setPhase(s, fx, Phase.PRECOPY_PASS, Math.max(1, s.pass));
    if (s.params.mode === MigrationMode.POSTCOPY) requestPostcopy(s, fx);
  } else if (status === "device" && out && s.phase !== Phase.POSTCOPY_ACTIVE) {
    setPhase(s, fx, Phase.SWITCHOVER, s.pass);
  }
  return { state: s, effects: fx };
}

function onCancel(s: MachineState, fx: Effect[], now: number): Transition {
  const v = cancelVerdict(s);
  if (!v.ok || s.cancelRequested) return { state: s, effects: fx };
  s.cancelRequested = true;
  switch (s.step) {
    case "check":
    case "destination":
    case "configure":
    case "prepare":
      return decide(s, fx, Phase.CANCELLED, "cancelled by request", now);
    case "migrate":
      // `migrate` is in flight: cancel as soon as QEMU accepted it (see migrate-accepted).
      return { state: s, effects: fx };
    case "running":
      return sendCancel(s, fx, now);
    case "resume":
      if (s.lostSince !== null || !s.migrateIssued) {
        return decide(s, fx, Phase.CANCELLED, "cancelled by request while the coordinator was recovering", now);
      }
      return sendCancel(s, fx, now);
    default:
      return { state: s, effects: fx };
  }
}

function sendCancel(s: MachineState, fx: Effect[], now: number): Transition {
  s.step = "cancelling";
  s.cancelSentAt = now;
  if (s.lostSince !== null) return decide(s, fx, Phase.CANCELLED, "cancelled by request while the hypervisor was unreachable", now);
  fx.push({ type: "cancel-qemu" });
  return { state: s, effects: fx };
}

function onTick(s: MachineState, fx: Effect[], now: number): Transition {
  if (s.outcome) return { state: s, effects: fx };
  if (s.lostSince !== null && now - s.lostSince >= s.timing.lossMs && needsHypervisor(s)) {
    const what = s.step === "resume" ? "after the coordinator restarted" : "mid-migration";
    const phase = s.cancelRequested ? Phase.CANCELLED : Phase.FAILED;
    return decide(s, fx, phase, `lost the connection to the ${s.params.direction === "outgoing" ? "source" : "destination"} hypervisor ${what} for ${s.timing.lossMs} ms`, now);
  }
  if (s.step === "prepare" && now >= s.prepareDeadlineAt) {
    // The balloon never fails a migration: at the deadline it goes ahead.
    return issueMigrate(s, fx, now);
  }
  if (s.step === "cancelling" && s.lostSince === null && now - s.cancelSentAt >= s.timing.cancelWaitMs) {
    return decide(s, fx, Phase.CANCELLED, `cancelled by request; QEMU did not confirm within ${s.timing.cancelWaitMs} ms`, now);
  }
  if (s.paused && s.params.direction === "outgoing" && s.lostSince === null && now - s.lastRecoverAt >= s.timing.recoverEveryMs) {
    // A resume that could not connect drops QEMU back to postcopy-paused: keep trying while it is.
    s.lastRecoverAt = now;
    fx.push({ type: "recover" });
  }
  if ((s.step === "running" || s.step === "cancelling") && s.lostSince === null && now - s.lastPollAt >= s.timing.pollMs) {
    s.lastPollAt = now;
    fx.push({ type: "poll" });
  }
  return { state: s, effects: fx };
}

function needsHypervisor(s: MachineState): boolean {
  return s.step === "migrate" || s.step === "running" || s.step === "cancelling" || s.step === "resume" || s.step === "check" || s.step === "configure";
}

function fail(s: MachineState, fx: Effect[], error: string, now: number): Transition {
  return decide(s, fx, s.cancelRequested ? Phase.CANCELLED : Phase.FAILED, error, now);
}

/** Fixes the outcome, then collects numbers and restores the balloon as the outcome needs. */
function decide(
  s: MachineState,
  fx: Effect[],
  phase: Phase.COMPLETED | Phase.FAILED | Phase.CANCELLED,
  error: string,
  now: number,
  qemuEnded = false,
): Transition {
  if (s.outcome) return { state: s, effects: fx };
  s.outcome = { phase, error };
  if (s.migrateStartedAt > 0) fx.push({ type: "timing", migrateMs: now - s.migrateStartedAt });
  if (s.lostSince !== null) {
    // Nothing can be asked of the hypervisor now: end, and leave the cleanup for its return.
    const restore = s.params.direction === "outgoing" && phase !== Phase.COMPLETED ? s.balloonBeforeBytes : 0;
    const cancelQemu = s.params.direction === "outgoing" && s.migrateIssued && phase !== Phase.COMPLETED;
    if (restore > 0 || cancelQemu) fx.push({ type: "cleanup-later", cancelQemu, restoreBalloonBytes: restore });
    return finish(s, fx);
  }
  if (s.params.direction === "outgoing" && phase !== Phase.COMPLETED && s.migrateIssued && !qemuEnded && s.step !== "cancelling") {
    // A failure of ours (not QEMU's) may leave QEMU migrating: stop it. Harmless when QEMU already ended.
    fx.push({ type: "cancel-qemu" });
  }
  s.step = "stats";
  fx.push({ type: "collect-stats" });
  return { state: s, effects: fx };
}

function advanceAfterOutcome(s: MachineState, fx: Effect[], done: "stats-done" | "restored", _now: number): Transition {
  const o = s.outcome;
  if (!o) return { state: s, effects: fx };
  if (done === "stats-done" && s.step === "stats") {
    const restore = s.params.direction === "outgoing" && o.phase !== Phase.COMPLETED && s.balloonBeforeBytes > 0;
    if (restore) {
      s.step = "restore";
      fx.push({ type: "restore-balloon", targetBytes: s.balloonBeforeBytes });
      return { state: s, effects: fx };
    }
    return finish(s, fx);
  }
  if (done === "restored" && s.step === "restore") return finish(s, fx);
  return { state: s, effects: fx };
}

function finish(s: MachineState, fx: Effect[]): Transition {
  const o = s.outcome!;
  s.step = "done";
  s.phase = o.phase;
  fx.push({ type: "phase", phase: o.phase, pass: s.pass, deadlineUnixMs: 0 });
  fx.push({ type: "final", phase: o.phase, error: o.error });
  return { state: s, effects: fx };
}
