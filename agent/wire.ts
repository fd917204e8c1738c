/**
 * The gRPC boundary: the only place where domain numbers become uint64
 * bigints and back (shared/units.ts toU64/toNumber).
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { PhaseEvent, Policy, SessionRequestSchema } from "../gen/ballast/v1/agent_pb.js";
import { BalloonReason, type BalloonState, type MemorySampleSchema } from "../gen/ballast/v1/common_pb.js";
import { toNumber, toU64 } from "../shared/units.js";
import type { DecisionReason, MemoryEstimate } from "./policy.js";
import type { CoordinatorBalloon, CoordinatorPolicy, Effect, PhaseSignal } from "./runtime.js";
import type { Sample } from "./sample.js";

/** A SessionRequest as the client accepts it. */
export type SessionRequestInit = MessageInitShape<typeof SessionRequestSchema>;

const REASONS: Record<DecisionReason, BalloonReason> = {
  steady: BalloonReason.STEADY_STATE,
  prepare: BalloonReason.PREPARE,
  demand: BalloonReason.DEMAND,
  restore: BalloonReason.RESTORE,
};

/** The wire enum for a policy reason. */
export function toBalloonReason(reason: DecisionReason): BalloonReason {
  return REASONS[reason];
}

/** A sample (and the estimate made from it) as a MemorySample. */
export function toMemorySample(sample: Sample, estimate: MemoryEstimate | undefined): MessageInitShape<typeof MemorySampleSchema> {
  const m = sample.meminfo;
  const v = sample.vmstat;
  const out: MessageInitShape<typeof MemorySampleSchema> = {
    timestampMs: BigInt(Math.floor(sample.timestampMs)),
    memTotalBytes: toU64(m.memTotal),
    memFreeBytes: toU64(m.memFree),
    memAvailableBytes: toU64(m.memAvailable),
    cachedBytes: toU64(m.cached),
    activeFileBytes: toU64(m.activeFile),
    inactiveFileBytes: toU64(m.inactiveFile),
    anonBytes: toU64(m.anonPages),
    shmemBytes: toU64(m.shmem),
    dirtyBytes: toU64(m.dirty),
    swapTotalBytes: toU64(m.swapTotal),
    swapFreeBytes: toU64(m.swapFree),
    balloonBytes: toU64(sample.balloon.bytes ?? estimate?.balloonBytes ?? 0),
    pgmajfault: toU64(v.pgmajfault),
    workingsetRefaultFile: toU64(v.workingsetRefaultFile),
    workingsetRefaultAnon: toU64(v.workingsetRefaultAnon),
    pswpin: toU64(v.pswpin),
    pswpout: toU64(v.pswpout),
    oomKill: toU64(v.oomKill),
  };
  if (sample.psi) {
    out.psiSomeAvg10 = sample.psi.some.avg10;
    out.psiFullAvg10 = sample.psi.full.avg10;
    out.psiSomeTotalUs = toU64(sample.psi.some.totalUs);
    out.psiFullTotalUs = toU64(sample.psi.full.totalUs);
  }
  if (estimate) {
    out.workingSetBytes = toU64(estimate.workingSetBytes);
    out.unreclaimableBytes = toU64(estimate.baseBytes);
  }
  return out;
}

/** A report, balloon or ack effect as a SessionRequest; other effects have no message. */
export function effectToRequest(effect: Effect): SessionRequestInit | undefined {
  switch (effect.kind) {
    case "report":
      return { msg: { case: "sample", value: toMemorySample(effect.sample, effect.estimate) } };
    case "balloon":
      return {
        msg: {
          case: "balloonRequest",
          value: { targetBytes: toU64(effect.targetBytes), reason: toBalloonReason(effect.reason), detail: effect.detail, migrationId: effect.migrationId },
        },
      };
    case "ack":
      return { msg: { case: "phaseAck", value: { migrationId: effect.migrationId, phase: effect.phase, targetBytes: toU64(effect.targetBytes) } } };
    default:
      return undefined;
  }
}

/** A PhaseEvent in domain units. */
export function phaseSignalFrom(event: PhaseEvent): PhaseSignal {
  const out: PhaseSignal = { migrationId: event.migrationId, phase: event.phase, pass: event.pass };
  const deadline = Number(event.deadlineUnixMs);
  if (deadline > 0) out.deadlineUnixMs = deadline;
  if (event.error) out.error = event.error;
  return out;
}

/** A Policy in domain units. */
export function policyFrom(policy: Policy): CoordinatorPolicy {
  return {
    floorBytes: toNumber(policy.floorBytes),
    maxBytes: toNumber(policy.maxBytes),
    sampleIntervalMs: policy.sampleIntervalMs,
    steadyState: policy.steadyState,
  };
}

/** A BalloonState in domain units. */
export function balloonFrom(state: BalloonState): CoordinatorBalloon {
  return { targetBytes: toNumber(state.targetBytes), actualBytes: toNumber(state.actualBytes), ramBytes: toNumber(state.ramBytes) };
}
