/**
 * The three checks every fault-matrix case makes, once the fault is over:
 * (1) the VM runs (on the source, or on the destination if switchover
 * happened) and the record agrees with where it runs; (2) the balloon is back
 * (the pre-migration target on the source, max on the destination); (3) the
 * record is final, and a restarted coordinator answers the same phase.
 */
import { expect, onTestFailed } from "vitest";
import { Phase } from "../../gen/ballast/v1/common_pb.js";
import type { Migration } from "../../gen/ballast/v1/migration_pb.js";
import { errorMessage } from "../../shared/errors.js";
import { MiB } from "../../shared/units.js";
import type { HostName, Lab } from "../../lab/lab.js";
import {
  grpcCode,
  guestAlive,
  logTail,
  qemuMigrateStatus,
  recordAfterRestart,
  settle,
  sleep,
  waitBalloon,
  waitFinal,
  waitQemuBalloon,
  type RunningMigration,
} from "../../lab/faults.js";
import type { VmHandle } from "../../lab/vm.js";

/** Prints both coordinators' log tails when the current test fails. */
export function dumpLogsOnFailure(lab: () => Lab | undefined, n = 60): void {
  onTestFailed(() => {
    const l = lab();
    if (!l) return;
    for (const h of ["a", "b"] as const) console.error(`--- coordinator ${h} (last ${n}) ---\n${logTail(l, h, n)}`);
  });
}

const QEMU_DONE = new Set(["completed", "failed", "cancelled", "none", ""]);

/** Waits until a QEMU has no migration in progress (or is gone); returns its last status. */
export async function waitQemuQuiet(vm: VmHandle | undefined, timeoutMs = 180_000): Promise<string> {
  const until = Date.now() + timeoutMs;
  let status = "gone";
  for (;;) {
    const s = await qemuMigrateStatus(vm);
    if (!s) return "gone";
    status = s.status ?? "none";
    if (s["error-desc"]) status += ` (${s["error-desc"]})`;
    if (QEMU_DONE.has(s.status ?? "none")) return status;
    if (Date.now() > until) return status;
    await sleep(500);
  }
}

/** The VM's balloon ceiling on a host (config max, else RAM). */
export async function balloonMax(lab: Lab, host: HostName): Promise<number> {
  const v = await lab.vm(host);
  return Number(v.maxBytes || v.balloon?.ramBytes || 0n);
}

export interface OutcomeOptions {
  /** Phases the record may end in. */
  phases: Phase[];
  /** Balloon target before the migration, as the test read it (GetVm). */
  targetBeforeBytes: number;
  /** Text the error must contain (case-insensitive regexp), when the phase is FAILED/CANCELLED. */
  errorMatches?: RegExp;
  /** How long the record may take to become final. Default 180 s. */
  finalTimeoutMs?: number;
  /** How long the balloon may take to come back. Default 60 s. */
  balloonTimeoutMs?: number;
  /** Skip the restart-survival check (e.g. the coordinator is known down). */
  skipRestart?: boolean;
}

export interface Outcome {
  record: Migration;
  where: HostName;
  /** The source QEMU's final query-migrate status. */
  qemuStatus: string;
  /** Seconds from the start of the migration until the record was final. */
  finalAfterS: number;
}

/** Runs checks (1)-(3) and leaves the lab settled on wherever the guest runs. */
export async function expectOutcome(lab: Lab, mig: RunningMigration, o: OutcomeOptions): Promise<Outcome> {
  const record = await waitFinal(lab, mig.source, mig.id, o.finalTimeoutMs ?? 180_000);
  const finalAfterS = (Date.now() - mig.startedAt) / 1000;
  // Let QEMU finish whatever it still does, so the guest's real location is known.
  const qemuStatus = await waitQemuQuiet(lab.hosts[mig.source].vm);
  const where = await settle(lab);
  console.log(
    `outcome ${mig.id.slice(0, 8)}: record ${Phase[record.phase]} after ${finalAfterS.toFixed(1)} s, error ${JSON.stringify(record.error)}, ` +
      `source QEMU ${qemuStatus}, guest on host ${where}`,
  );

  // (3) what happened, in the record.
  expect(o.phases.map((p) => Phase[p])).toContain(Phase[record.phase]);
  if (record.phase !== Phase.COMPLETED) {
    expect(record.error).not.toBe("");
    if (o.errorMatches) expect(record.error).toMatch(o.errorMatches);
  }
  // (1) the VM runs, where the record says it should.
  expect(await guestAlive(lab.shell)).toBe(true);
  expect(where).toBe(record.phase === Phase.COMPLETED ? mig.destination : mig.source);
  const vm = await lab.waitVm(where, (v) => v.qmpConnected && v.runState === "running", `VM running on host ${where}`, 30_000);
  expect(vm.runState).toBe("running");
  // (2) the balloon.
  if (where === mig.source) {
    const want = o.targetBeforeBytes;
    if (Number(record.balloonTargetBeforeBytes) !== 0) expect(Number(record.balloonTargetBeforeBytes)).toBe(want);
    await waitBalloon(lab, where, (t) => Math.abs(t - want) < MiB, `balloon target restored to ${want / MiB} MiB on host ${where}`, o.balloonTimeoutMs ?? 60_000);
    // And the guest really is that size (QEMU's own query-balloon, not the coordinator's view).
    const real = await waitQemuBalloon(lab.hosts[where].vm, (a) => Math.abs(a - want) <= 16 * MiB, o.balloonTimeoutMs ?? 60_000);
    expect(Math.abs((real ?? 0) - want)).toBeLessThanOrEqual(16 * MiB);
  } else {
    const max = await balloonMax(lab, where);
    await waitBalloon(lab, where, (t) => t >= max, `balloon target at max on host ${where}`, o.balloonTimeoutMs ?? 60_000);
    const real = await waitQemuBalloon(lab.hosts[where].vm, (a) => a >= max - 16 * MiB, o.balloonTimeoutMs ?? 60_000);
    expect(real ?? 0).toBeGreaterThanOrEqual(max - 16 * MiB);
  }
  // (3) the record survives a restart of the coordinator that owns it.
  if (!o.skipRestart) {
    const again = await recordAfterRestart(lab, mig.source, mig.id);
    expect(Phase[again.phase]).toBe(Phase[record.phase]);
  }
  return { record, where, qemuStatus, finalAfterS };
}

/** The target the active host's coordinator reports now. */
export async function currentTarget(lab: Lab, host: HostName = lab.active): Promise<number> {
  const v = await lab.waitVm(host, (x) => x.qmpConnected && x.balloon !== undefined, `balloon known on host ${host}`, 30_000);
  return Number(v.balloon?.targetBytes ?? 0n);
}

/** Calls CancelMigration on `host` and times it; never throws: a refusal comes back as its gRPC code and message. */
export async function timedCancel(lab: Lab, host: HostName, id: string): Promise<{ ms: number; phase?: Phase; code?: number; err?: string }> {
  const t = Date.now();
  try {
    const res = await lab.hosts[host].migrations.cancelMigration({ id }, { deadlineMs: 20_000 });
    return { ms: Date.now() - t, phase: res.migration?.phase };
  } catch (err) {
    return { ms: Date.now() - t, code: grpcCode(err), err: errorMessage(err) };
  }
}
