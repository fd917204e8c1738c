/**
 * Pure rules for agent balloon requests. Agents run inside guests and are
 * untrusted: a request is a hint that the coordinator clamps and may refuse,
 * depending on the reason given and on what the VM is doing right now.
 */
import { BalloonReason, Phase } from "../gen/ballast/v1/common_pb.js";

/** What the coordinator knows about the VM when a request arrives. */
export interface GuardState {
  floorBytes: number;
  maxBytes: number;
  /** The target in force, if any has been set. */
  currentTargetBytes: number | undefined;
  /** The migration touching this VM on this host, if any. */
  migration?: { id: string; phase: Phase; direction: "outgoing" | "incoming" };
}

/** A request as received, already converted to numbers. */
export interface GuardRequest {
  targetBytes: number;
  reason: BalloonReason;
  migrationId: string;
}

/** The verdict: apply `targetBytes` (maybe forced past the rate limit), or refuse with a reason. */
export type GuardVerdict =
  | { accept: true; targetBytes: number; force: boolean; clamped: boolean }
  | { accept: false; why: string };

const PREPARE_PHASES = new Set<Phase>([Phase.PREPARE, Phase.PRECOPY_PASS]);
const ENDED = new Set<Phase>([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED]);

/**
 * Decides whether and how to apply an agent's balloon request.
 * Growing the guest (a larger target) is always safe and never refused;
 * shrinking it is allowed only when the reason fits the VM's state.
 */
export function guardBalloonRequest(req: GuardRequest, state: GuardState): GuardVerdict {
  if (!Number.isFinite(req.targetBytes) || req.targetBytes <= 0) {
    return { accept: false, why: `target ${req.targetBytes} is not a positive byte count` };
  }
  const clampedTarget = Math.min(Math.max(req.targetBytes, state.floorBytes), state.maxBytes);
  const clamped = clampedTarget !== req.targetBytes;
  const grows = state.currentTargetBytes === undefined || clampedTarget >= state.currentTargetBytes;
  // A migration that has ended no longer restricts anything.
  const m = state.migration && !ENDED.has(state.migration.phase) ? state.migration : undefined;
  const ok = (force: boolean): GuardVerdict => ({ accept: true, targetBytes: clampedTarget, force, clamped });

  switch (req.reason) {
    case BalloonReason.STEADY_STATE:
      if (m && !grows) return { accept: false, why: `steady-state shrink refused while migration ${m.id} is ${Phase[m.phase]}` };
      // Growth must not wait for the rate limit: the guest may need it now.
      return ok(grows);
    case BalloonReason.PREPARE:
      if (!m || m.direction !== "outgoing" || m.id !== req.migrationId) {
        return { accept: false, why: `PREPARE request for migration ${JSON.stringify(req.migrationId)} but none such is outgoing here` };
      }
      if (!PREPARE_PHASES.has(m.phase)) return { accept: false, why: `PREPARE request arrived in phase ${Phase[m.phase]}` };
      return ok(true);
    case BalloonReason.DEMAND:
      if (!grows) return { accept: false, why: "DEMAND request would shrink the guest" };
      return ok(true);
    case BalloonReason.RESTORE:
      if (m && !grows) {
        return { accept: false, why: `RESTORE shrink refused while migration ${m.id} is ${Phase[m.phase]}` };
      }
      return ok(true);
    default:
      return { accept: false, why: `unknown balloon reason ${req.reason}` };
  }
}
