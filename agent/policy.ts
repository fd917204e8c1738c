/**
 * The policy (MOM's "Policy"): pure functions from a {@link Sample} and a
 * little state to a balloon target. No I/O, no clocks, no gRPC types, so every
 * rule is a row in a table test.
 *
 * All sizes are bytes. A "target" is what the guest KEEPS (QEMU's `balloon`
 * value): RAM size minus what the balloon holds.
 *
 * The arithmetic, in one place (see {@link estimateMemory}):
 *
 *   inUse      = ram − balloon − MemFree
 *   fileLru    = Active(file) + Inactive(file)
 *   pinnedFile = min(fileLru, Dirty + Writeback)
 *   base       = max(0, inUse − fileLru) + pinnedFile
 *   steadyHot  = min(fileLru, max(Active(file), Mapped))
 *   prepareHot = min(fileLru, max(Mapped, prepareActiveFileKeep × Active(file)))
 *   steadyRaw  = base + steadyHot  + highWatermark + reserve
 *   prepareRaw = base + prepareHot + highWatermark + reserve
 *
 * and every target is clamped to [floor, max] (floor wins if they cross).
 */
import type { GuestBalloon, Sample } from "./sample.js";
import { PAGE_SIZE } from "./procfs.js";
import { MiB, formatMiB as mib } from "../shared/units.js";

/** Why a target was chosen; maps 1:1 onto the wire's BalloonReason. */
export type DecisionReason = "steady" | "prepare" | "demand" | "restore";

/** Tuning of the policy. Every field has a default in {@link DEFAULT_POLICY_OPTIONS}. */
export interface PolicyOptions {
  /**
   * Free headroom kept ABOVE the kswapd high watermark and the hot file set.
   * Default 128 MiB: the rig's 1 GiB cache-heavy guest fell into constant
   * reclaim with 64 MiB (kswapd's high watermark ate it) and kept full speed
   * with 128 MiB.
   */
  reserveBytes: number;
  /** The agent's own floor, applied even when the coordinator's Policy says less. Default 256 MiB (the rig's smallest working set plus boot reserve was ~281 MiB). */
  hardFloorBytes: number;
  /**
   * Share of Active(file) that PREPARE keeps beyond Mapped. Default 0.25:
   * Mapped already covers the program text that refaulted on the rig; the
   * quarter of the remaining active cache hedges for data read with read(),
   * which Mapped cannot see. Refaults/PSI grow the guest back if this is low.
   */
  prepareActiveFileKeep: number;
  /** Steady state shrinks only after the lower estimate held for this many samples in a row. Default 5. */
  shrinkHoldSamples: number;
  /** Largest steady-state shrink per sample. Default 32 MiB: below the ~70–100 MiB/s that inflating against page cache reached on the rig. */
  maxShrinkStepBytes: number;
  /** Changes smaller than this are not worth a balloon request (QEMU reports at most ~1 change/s). Default 16 MiB. */
  minChangeBytes: number;
  /** Growth per sample under pressure. Default 128 MiB: deflating is fast (674 MiB in 0.4–0.9 s on the rig). */
  growStepBytes: number;
  /** Memory PSI "some" (percent of time stalled) at or above which the guest is under pressure. Default 10. */
  psiSomeThresholdPct: number;
  /** Refaults plus swap-ins per second at or above which the guest is under pressure. Default 500 (~2 MiB/s; the rig's over-squeezed guest refaulted thousands per second). */
  refaultRateThreshold: number;
  /** MemAvailable below this means pressure. Default 64 MiB: half the reserve, so a freshly prepared guest does not trip it. */
  lowAvailableBytes: number;
  /** No steady-state shrink for this long after pressure was seen. Default 30000 ms. */
  pressureCooldownMs: number;
  /** Rates need at least this much time between samples to mean anything. Default 100 ms. */
  minRateWindowMs: number;
  /**
   * When the coordinator has not told the RAM size, it is estimated as
   * MemTotal (balloon added back) + bootReservedBaseBytes + bootReservedFraction × that.
   * Defaults 48 MiB and 0.02: a 1 GiB guest reserved ~65 MiB at boot on the rig.
   * Overestimating RAM only makes targets higher (safer).
   */
  bootReservedBaseBytes: number;
  /** See {@link PolicyOptions.bootReservedBaseBytes}. */
  bootReservedFraction: number;
  /** Targets are rounded up to a multiple of this. Default 1 MiB. */
  alignBytes: number;
}

/** The defaults, with the reasons given on {@link PolicyOptions}. */
export const DEFAULT_POLICY_OPTIONS: Readonly<PolicyOptions> = Object.freeze({
  reserveBytes: 128 * MiB,
  hardFloorBytes: 256 * MiB,
  prepareActiveFileKeep: 0.25,
  shrinkHoldSamples: 5,
  maxShrinkStepBytes: 32 * MiB,
  minChangeBytes: 16 * MiB,
  growStepBytes: 128 * MiB,
  psiSomeThresholdPct: 10,
  refaultRateThreshold: 500,
  lowAvailableBytes: 64 * MiB,
  pressureCooldownMs: 30_000,
  minRateWindowMs: 100,
  bootReservedBaseBytes: 48 * MiB,
  bootReservedFraction: 0.02,
  alignBytes: MiB,
});

/** What the coordinator told about the balloon (BalloonState); 0 or absent means unknown. */
export interface BalloonContext {
  ramBytes?: number;
  actualBytes?: number;
}

/** The memory picture behind every decision; also sent to the coordinator as hints. */
export interface MemoryEstimate {
  /** RAM size as QEMU sees it. */
  ramBytes: number;
  ramSource: "coordinator" | "estimate";
  /** What the balloon holds now. */
  balloonBytes: number;
  balloonSource: GuestBalloon["source"] | "coordinator" | "assumed-zero";
  /** What deflate-on-oom was taken to be (unknown counts as off: see estimateMemory). */
  deflateOnOom: boolean;
  /** MemTotal with the balloon added back when the driver removed it from MemTotal. */
  unballoonedTotalBytes: number;
  /** Memory the guest uses now, kernel boot reserve included: ram − balloon − MemFree. */
  inUseBytes: number;
  fileLruBytes: number;
  pinnedFileBytes: number;
  /** Everything in use that dropping clean page cache cannot free. */
  baseBytes: number;
  steadyHotFileBytes: number;
  prepareHotFileBytes: number;
  watermarkHighBytes: number;
  reserveBytes: number;
  /** base + steadyHot: what the workload needs now. */
  workingSetBytes: number;
  /** Steady-state target before clamping. */
  steadyRawBytes: number;
  /** PREPARE target before clamping. */
  prepareRawBytes: number;
}

/**
 * Builds the {@link MemoryEstimate} for a sample.
 *
 * Deflate-on-oom: with it, inflated pages stay in MemTotal and leave MemFree;
 * without it, they leave MemTotal. When the coordinator gave ram_bytes this
 * does not matter: ram − balloon − MemFree is the memory in use either way.
 * It matters only for the RAM estimate (unballoonedTotal = MemTotal + balloon
 * when the feature is off), and "unknown" is taken as off: if the feature is
 * really on, RAM and inUse come out too high by the balloon size, which
 * errs towards a larger (safer) target.
 *
 * Balloon size: the guest's own counters first, else ram − actual from the
 * coordinator, else 0, which again overstates inUse rather than understating it.
 */
export function estimateMemory(sample: Sample, ctx: BalloonContext, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): MemoryEstimate {
  const m = sample.meminfo;
  const knownRam = ctx.ramBytes !== undefined && ctx.ramBytes > 0 ? ctx.ramBytes : undefined;
  let balloonBytes = 0;
  let balloonSource: MemoryEstimate["balloonSource"] = "assumed-zero";
  if (sample.balloon.bytes !== undefined) {
    balloonBytes = sample.balloon.bytes;
    balloonSource = sample.balloon.source;
  } else if (knownRam !== undefined && ctx.actualBytes !== undefined && ctx.actualBytes > 0) {
    balloonBytes = Math.max(0, knownRam - ctx.actualBytes);
    balloonSource = "coordinator";
  }
  const deflateOnOom = sample.balloon.deflateOnOom ?? false;
  const unballoonedTotalBytes = m.memTotal + (deflateOnOom ? 0 : balloonBytes);
  const ramBytes =
    knownRam ?? Math.ceil(unballoonedTotalBytes + options.bootReservedBaseBytes + options.bootReservedFraction * unballoonedTotalBytes);
  const inUseBytes = Math.max(0, ramBytes - balloonBytes - m.memFree);
  const fileLruBytes = m.activeFile + m.inactiveFile;
  const pinnedFileBytes = Math.min(fileLruBytes, m.dirty + m.writeback);
  const baseBytes = Math.max(0, inUseBytes - fileLruBytes) + pinnedFileBytes;
  const steadyHotFileBytes = Math.min(fileLruBytes, Math.max(m.activeFile, m.mapped));
  const prepareHotFileBytes = Math.min(fileLruBytes, Math.max(m.mapped, Math.ceil(options.prepareActiveFileKeep * m.activeFile)));
  const watermarkHighBytes = sample.watermarks.highBytes;
  const reserveBytes = options.reserveBytes;
  return {
    ramBytes,
    ramSource: knownRam !== undefined ? "coordinator" : "estimate",
    balloonBytes,
    balloonSource,
    deflateOnOom,
    unballoonedTotalBytes,
    inUseBytes,
    fileLruBytes,
    pinnedFileBytes,
    baseBytes,
    steadyHotFileBytes,
    prepareHotFileBytes,
    watermarkHighBytes,
    reserveBytes,
    workingSetBytes: baseBytes + steadyHotFileBytes,
    steadyRawBytes: baseBytes + steadyHotFileBytes + watermarkHighBytes + reserveBytes,
    prepareRawBytes: baseBytes + prepareHotFileBytes + watermarkHighBytes + reserveBytes,
  };
}

/** The coordinator's Policy bounds; 0 means "not set". */
export interface PolicyBounds {
  floorBytes?: number;
  maxBytes?: number;
}

/** Resolved bounds every target is clamped into. */
export interface Bounds {
  floorBytes: number;
  maxBytes: number;
}

/**
 * floor = max(Policy.floor, hardFloor); max = Policy.max if set, else RAM,
 * and never above RAM when RAM came from the coordinator (QEMU caps there anyway).
 */
export function resolveBounds(policy: PolicyBounds | undefined, ramBytes: number, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): Bounds {
  const floorBytes = Math.max(policy?.floorBytes ?? 0, options.hardFloorBytes);
  const maxBytes = policy?.maxBytes !== undefined && policy.maxBytes > 0 ? Math.min(policy.maxBytes, ramBytes) : ramBytes;
  return { floorBytes, maxBytes };
}

/**
 * Clamps into [floor, max] and rounds up to `alignBytes` (without crossing
 * max). If floor > max, floor wins: the floor is the safety promise.
 */
export function clampTarget(bytes: number, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): number {
  const align = Math.max(1, options.alignBytes);
  let t = Math.ceil(bytes / align) * align;
  if (t > bounds.maxBytes) t = bounds.maxBytes;
  if (t < bounds.floorBytes) t = bounds.floorBytes;
  return t;
}

/** Pressure signals of one sample, relative to the previous one. */
export interface Pressure {
  /** True when any signal crossed its threshold. */
  under: boolean;
  /** True when the OOM killer ran since the previous sample. */
  severe: boolean;
  /** Human-readable reasons, for logs and BalloonRequest.detail. */
  reasons: string[];
  /** max(PSI some avg10, PSI some over the last interval); undefined without PSI. */
  psiSomePct?: number;
  /** (refault_file + refault_anon + pswpin) per second; undefined without a usable previous sample. */
  refaultsPerSec?: number;
  memAvailableBytes: number;
  oomKills: number;
}

function delta(now: number, before: number): number {
  // Counters never go backwards in one boot; a negative delta means a mismatch, count nothing.
  return now >= before ? now - before : 0;
}

/**
 * Looks at PSI, refault rate, MemAvailable and OOM kills.
 *
 * PSI uses the larger of avg10 and the stall share over the last interval
 * (from the `total` counters): avg10 lags by seconds, too slow for a 200 ms
 * post-copy loop.
 */
export function assessPressure(sample: Sample, prev: Sample | undefined, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): Pressure {
  const reasons: string[] = [];
  const dtMs = prev ? sample.monotonicMs - prev.monotonicMs : 0;
  const usable = prev !== undefined && dtMs >= options.minRateWindowMs;
  let psiSomePct: number | undefined;
  if (sample.psi) {
    psiSomePct = sample.psi.some.avg10;
    if (usable && prev.psi) {
      const recent = (delta(sample.psi.some.totalUs, prev.psi.some.totalUs) / (dtMs * 1000)) * 100;
      psiSomePct = Math.max(psiSomePct, Math.min(100, recent));
    }
    if (psiSomePct >= options.psiSomeThresholdPct) reasons.push(`psi some ${psiSomePct.toFixed(1)}% >= ${options.psiSomeThresholdPct}%`);
  }
  let refaultsPerSec: number | undefined;
  if (usable) {
    const v = sample.vmstat;
    const p = prev.vmstat;
    const events =
      delta(v.workingsetRefaultFile, p.workingsetRefaultFile) + delta(v.workingsetRefaultAnon, p.workingsetRefaultAnon) + delta(v.pswpin, p.pswpin);
    refaultsPerSec = events / (dtMs / 1000);
    if (refaultsPerSec >= options.refaultRateThreshold) reasons.push(`refaults ${Math.round(refaultsPerSec)}/s >= ${options.refaultRateThreshold}/s`);
  }
  const memAvailableBytes = sample.meminfo.memAvailable;
  if (memAvailableBytes < options.lowAvailableBytes) reasons.push(`MemAvailable ${mib(memAvailableBytes)} < ${mib(options.lowAvailableBytes)}`);
  const oomKills = prev ? delta(sample.vmstat.oomKill, prev.vmstat.oomKill) : 0;
  if (oomKills > 0) reasons.push(`${oomKills} OOM kill(s)`);
  const out: Pressure = { under: reasons.length > 0, severe: oomKills > 0, reasons, memAvailableBytes, oomKills };
  if (psiSomePct !== undefined) out.psiSomePct = psiSomePct;
  if (refaultsPerSec !== undefined) out.refaultsPerSec = refaultsPerSec;
  return out;
}

/**
 * The target to grow to under pressure, in any phase:
 * after an OOM kill, max at once; otherwise current + max(growStep,
 * reserve − MemAvailable), so a MemAvailable shortfall is closed in one step.
 */
export function pressureTarget(current: number, pressure: Pressure, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): number {
  if (pressure.severe) return clampTarget(bounds.maxBytes, bounds, options);
  const shortfall = options.reserveBytes - pressure.memAvailableBytes;
  return clampTarget(current + Math.max(options.growStepBytes, shortfall), bounds, options);
}

/** A policy decision: a target to request, or none. */
export interface Decision {
  /** The target to request; undefined means "leave the balloon alone". */
  targetBytes?: number;
  reason: DecisionReason;
  /** One line: the formula and numbers behind the target. */
  detail: string;
}

/** State the steady-state rule carries between samples. */
export interface SteadyTracker {
  /** Consecutive samples whose estimate was below the current target by at least minChange. */
  belowCount: number;
  /** The clamped estimates of those samples (at most shrinkHoldSamples). */
  recentBytes: number[];
  /** Monotonic ms of the last pressure, if any. */
  lastPressureMs?: number;
}

/** A tracker with no history. */
export function freshTracker(lastPressureMs?: number): SteadyTracker {
  return lastPressureMs === undefined ? { belowCount: 0, recentBytes: [] } : { belowCount: 0, recentBytes: [], lastPressureMs };
}

/** Inputs of {@link steadyDecision}. */
export interface SteadyInput {
  /** The target in force now. */
  currentBytes: number;
  /** undefined when the sample was incomplete. */
  estimate?: MemoryEstimate;
  pressure?: Pressure;
  tracker: SteadyTracker;
  /** Monotonic ms of the sample. */
  nowMs: number;
}

/**
 * Steady-state self-ballooning: fast to grow, slow to shrink.
 *
 * - pressure: grow now (see {@link pressureTarget}), remember when;
 * - estimate above current by ≥ minChange: grow to it now;
 * - estimate below current by ≥ minChange for shrinkHoldSamples samples in a
 *   row, and no pressure for pressureCooldownMs: shrink to the HIGHEST of
 *   those estimates, by at most maxShrinkStep per sample;
 * - incomplete sample: do nothing and restart the count.
 */
export function steadyDecision(input: SteadyInput, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): { decision: Decision; tracker: SteadyTracker } {
  const { currentBytes: current, estimate, pressure, nowMs } = input;
  const last = input.tracker.lastPressureMs;
  if (!estimate || !pressure) {
    return { decision: { reason: "steady", detail: "incomplete sample: hold" }, tracker: freshTracker(last) };
  }
  if (pressure.under) {
    const target = pressureTarget(current, pressure, bounds, options);
    const decision: Decision = { reason: "demand", detail: `pressure (${pressure.reasons.join("; ")}): ${mib(current)} -> ${mib(target)}` };
    if (target > current) decision.targetBytes = target;
    return { decision, tracker: freshTracker(nowMs) };
  }
  const raw = clampTarget(estimate.steadyRawBytes, bounds, options);
  const detail = steadyDetail(estimate);
  if (raw >= current + options.minChangeBytes) {
    return { decision: { targetBytes: raw, reason: "steady", detail: `grow: ${detail}` }, tracker: freshTracker(last) };
  }
  if (raw > current - options.minChangeBytes) {
    return { decision: { reason: "steady", detail: `within ${mib(options.minChangeBytes)} of current: ${detail}` }, tracker: freshTracker(last) };
  }
  const hold = Math.max(1, options.shrinkHoldSamples);
  const tracker: SteadyTracker = {
    belowCount: input.tracker.belowCount + 1,
    recentBytes: [...input.tracker.recentBytes, raw].slice(-hold),
  };
  if (last !== undefined) tracker.lastPressureMs = last;
  if (tracker.belowCount < hold) {
    return { decision: { reason: "steady", detail: `lower estimate held ${tracker.belowCount}/${hold}: ${detail}` }, tracker };
  }
  if (last !== undefined && nowMs - last < options.pressureCooldownMs) {
    return { decision: { reason: "steady", detail: `pressure ${Math.round(nowMs - last)} ms ago: no shrink` }, tracker };
  }
  const held = Math.max(...tracker.recentBytes);
  const target = clampTarget(Math.max(held, current - options.maxShrinkStepBytes), bounds, options);
  if (target >= current) return { decision: { reason: "steady", detail: `nothing to shrink: ${detail}` }, tracker };
  return { decision: { targetBytes: target, reason: "steady", detail: `shrink ${mib(current)} -> ${mib(target)} (held ${mib(held)}): ${detail}` }, tracker };
}

/**
 * The PREPARE target: give back everything but what the workload needs,
 * clean page cache included. Under pressure, grow instead (same reason:
 * the coordinator waits for a PREPARE request before it migrates).
 * Always yields a target, even when it equals the current one.
 */
export function prepareDecision(estimate: MemoryEstimate, pressure: Pressure, currentBytes: number, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): Decision {
  if (pressure.under) {
    // Still reason "prepare": it is the answer the coordinator waits for, and a growing PREPARE is always accepted.
    const target = Math.max(currentBytes, pressureTarget(currentBytes, pressure, bounds, options));
    return { targetBytes: target, reason: "prepare", detail: `PREPARE under pressure (${pressure.reasons.join("; ")}): grow to ${mib(target)}` };
  }
  const target = clampTarget(estimate.prepareRawBytes, bounds, options);
  const e = estimate;
  return {
    targetBytes: target,
    reason: "prepare",
    detail:
      `base ${mib(e.baseBytes)} + hot file ${mib(e.prepareHotFileBytes)} + high wmark ${mib(e.watermarkHighBytes)} + reserve ${mib(e.reserveBytes)}` +
      ` = ${mib(e.prepareRawBytes)} -> ${mib(target)} in [${mib(bounds.floorBytes)}, ${mib(bounds.maxBytes)}]`,
  };
}

/**
 * How much page cache to reclaim before a PREPARE inflation, so the balloon
 * finds free pages instead of reclaiming at 70–100 MiB/s itself:
 * the shrink (current − target) minus the free memory above the high
 * watermark, capped at the clean cache PREPARE does not keep.
 */
export function prepareReclaimBytes(estimate: MemoryEstimate, sample: Sample, currentBytes: number, targetBytes: number): number {
  const shrink = currentBytes - targetBytes;
  if (shrink <= 0) return 0;
  const freeAboveWatermark = Math.max(0, sample.meminfo.memFree - estimate.watermarkHighBytes);
  const coldCache = Math.max(0, estimate.fileLruBytes - estimate.pinnedFileBytes - estimate.prepareHotFileBytes);
  const bytes = Math.min(coldCache, Math.max(0, shrink - freeAboveWatermark));
  return Math.floor(bytes / PAGE_SIZE) * PAGE_SIZE;
}

/** Post-copy: deflate on demand only; never shrink while pages still arrive from the source. */
export function postcopyDecision(currentBytes: number, pressure: Pressure | undefined, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): Decision {
  if (!pressure) return { reason: "demand", detail: "incomplete sample: hold" };
  if (!pressure.under) return { reason: "demand", detail: "no pressure" };
  const target = pressureTarget(currentBytes, pressure, bounds, options);
  const decision: Decision = { reason: "demand", detail: `post-copy pressure (${pressure.reasons.join("; ")}): ${mib(currentBytes)} -> ${mib(target)}` };
  if (target > currentBytes) decision.targetBytes = target;
  return decision;
}

/** Inputs of {@link restoreDecision}. */
export interface RestoreInput {
  currentBytes: number;
  /** undefined when the sample was incomplete. */
  estimate?: MemoryEstimate;
  /** The target in force when PREPARE arrived, if known. */
  targetBeforePrepareBytes?: number;
  /** Policy.steady_state. */
  steadyState: boolean;
}

/**
 * After COMPLETED / FAILED / CANCELLED: go back to where steady state would
 * be, never lower than now (shrinking again is steady state's slow job).
 * - steady state on: max(steady estimate, target before PREPARE);
 * - steady state off: the target before PREPARE, else max (fully deflated);
 * - incomplete sample: the target before PREPARE, else max.
 */
export function restoreDecision(input: RestoreInput, bounds: Bounds, options: PolicyOptions = DEFAULT_POLICY_OPTIONS): Decision {
  const before = input.targetBeforePrepareBytes;
  let wanted: number;
  let why: string;
  if (input.steadyState && input.estimate) {
    wanted = Math.max(input.estimate.steadyRawBytes, before ?? 0);
    why = `max(steady ${mib(input.estimate.steadyRawBytes)}, before PREPARE ${before === undefined ? "unknown" : mib(before)})`;
  } else {
    wanted = before ?? bounds.maxBytes;
    why = before === undefined ? `max ${mib(bounds.maxBytes)}` : `before PREPARE ${mib(before)}`;
  }
  const target = Math.max(input.currentBytes, clampTarget(wanted, bounds, options));
  const decision: Decision = { reason: "restore", detail: `restore to ${why} -> ${mib(target)}` };
  if (target > input.currentBytes) decision.targetBytes = target;
  return decision;
}

function steadyDetail(e: MemoryEstimate): string {
  return `base ${mib(e.baseBytes)} + hot file ${mib(e.steadyHotFileBytes)} + high wmark ${mib(e.watermarkHighBytes)} + reserve ${mib(e.reserveBytes)} = ${mib(e.steadyRawBytes)}`;
}
