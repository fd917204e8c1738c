/**
 * Fault injection and observation helpers for the fault-matrix tests: kill
 * or stop the guest agent, crash and restart a host's coordinator, kill and
 * restart QEMU, drive a migration without the lab's happy-path wrapper, and
 * work out afterwards where the guest is. Everything acts on processes the
 * lab started, by PID, or inside the guest through its serial shell.
 */
import { Phase } from "../gen/ballast/v1/common_pb.js";
import type { MigrateRequestSchema, Migration } from "../gen/ballast/v1/migration_pb.js";
import type { Vm } from "../gen/ballast/v1/vm_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { QmpClient } from "../coordinator/qmp-client.js";
import { FailedPreconditionError, DeadlineError, errorMessage } from "../shared/errors.js";
import type { HostName, Lab } from "./lab.js";
import type { GuestShell } from "./serial-shell.js";
import type { VmHandle } from "./vm.js";

import { sleep } from "../shared/retry.js";
export { sleep };

const FINAL = new Set([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED]);
export const isFinalPhase = (p: Phase) => FINAL.has(p);

// ---------------------------------------------------------------- agent

/** PIDs of the guest agent's node processes (the supervisor's child). */
export async function agentPids(shell: GuestShell): Promise<number[]> {
  const r = await shell.run("for p in $(pidof node); do grep -q ballast-agent /proc/$p/cmdline 2>/dev/null && echo $p; done; true", { timeoutMs: 20_000 });
  return r.output
    .split(/\s+/)
    .filter((x) => /^\d+$/.test(x))
    .map(Number);
}

/** `kill -9` the agent (the supervisor restarts it after 1 s, as systemd would). Returns the PIDs killed. */
export async function killAgent(shell: GuestShell): Promise<number[]> {
  const pids = await agentPids(shell);
  if (pids.length === 0) throw new FailedPreconditionError("no ballast-agent process in the guest");
  await shell.run(`kill -9 ${pids.join(" ")}`, { timeoutMs: 20_000 });
  return pids;
}

/** `kill -STOP` (or -CONT) the given agent PIDs. */
export async function signalAgent(shell: GuestShell, pids: number[], signal: "STOP" | "CONT"): Promise<void> {
  const r = await shell.run(`kill -${signal} ${pids.join(" ")}`, { timeoutMs: 30_000 });
  if (r.exitCode !== 0) throw new FailedPreconditionError(`kill -${signal} ${pids.join(" ")} failed: ${r.output}`);
}

/** The process state letter of a guest PID (`T` when stopped). */
export async function guestProcState(shell: GuestShell, pid: number): Promise<string> {
  const r = await shell.run(`awk '{print $3}' /proc/${pid}/stat 2>/dev/null`, { timeoutMs: 30_000 });
  return r.output.trim();
}

// ---------------------------------------------------------------- QEMU

/** SIGKILL a lab QEMU by PID and wait until it has exited. */
export async function killQemu(vm: VmHandle): Promise<void> {
  try {
    process.kill(vm.pid, "SIGKILL");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ESRCH") throw err;
  }
  await vm.exited;
}

/** One QMP command on a lab QEMU's own (lab) QMP socket, outside any coordinator. */
export async function labQmp<T = Record<string, unknown>>(vm: VmHandle, command: string, args?: Record<string, unknown>, timeoutMs = 5000): Promise<T> {
  const q = new QmpClient({ socketPath: vm.labQmpPath, reconnect: false, connectTimeoutMs: timeoutMs, commandTimeoutMs: timeoutMs });
  try {
    await q.connect();
    return await q.execute<T>(command, args);
  } finally {
    await q.close().catch(() => {});
  }
}

/** QEMU's run state (`running`, `inmigrate`, `postmigrate`, `paused`, `finish-migrate`…) or "gone". */
export async function qemuRunState(vm: VmHandle | undefined): Promise<string> {
  if (!vm) return "gone";
  try {
    return String((await labQmp<{ status: string }>(vm, "query-status")).status);
  } catch {
    return "gone";
  }
}

/** `query-migrate` on a lab QEMU (status and error-desc), or undefined. */
export async function qemuMigrateStatus(vm: VmHandle | undefined): Promise<{ status?: string; "error-desc"?: string } | undefined> {
  if (!vm) return undefined;
  return labQmp<{ status?: string; "error-desc"?: string }>(vm, "query-migrate").catch(() => undefined);
}

// ---------------------------------------------------------------- migrations

/** A migration started on the active host's coordinator, followed in the background. */
export interface RunningMigration {
  id: string;
  source: HostName;
  destination: HostName;
  startedAt: number;
  /** Every snapshot the Migrate stream delivered. */
  updates: Migration[];
  /** When each phase was first seen on the stream (ms since epoch). */
  seenAt: Map<Phase, number>;
  /** Resolves when the stream ends: with its last record, or the error that broke it. Never rejects. */
  ended: Promise<{ last?: Migration; err?: unknown }>;
  /** Resolves with the first snapshot in `phase` (from the stream); rejects on timeout or stream end. */
  phase(phase: Phase, timeoutMs?: number): Promise<Migration>;
}

/**
 * Starts an incoming QEMU on the other host (unless `incoming: false`),
 * calls Migrate on the active host and resolves as soon as the first record
 * (with its id) arrives. `destination` overrides the destination address.
 */
export async function beginMigration(
  lab: Lab,
  request: Omit<MessageInitShape<typeof MigrateRequestSchema>, "vm" | "$typeName">,
  opts: { incoming?: boolean } = {},
): Promise<RunningMigration> {
  const source = lab.active;
  const destination = lab.other;
  if (opts.incoming !== false) await lab.startIncoming();
  const updates: Migration[] = [];
  const seenAt = new Map<Phase, number>();
  const waiters = new Set<() => void>();
  let endedFlag = false;
  const stream = lab.hosts[source].migrations.migrate({ destination: lab.hosts[destination].coordinator.address, ...request, vm: "vm1" });
  let gotFirst: (m: Migration) => void = () => {};
  let failFirst: (e: unknown) => void = () => {};
  const first = new Promise<Migration>((res, rej) => ((gotFirst = res), (failFirst = rej)));
  const ended = (async () => {
    let last: Migration | undefined;
    try {
      for await (const msg of stream) {
        if (!msg.migration) continue;
        last = msg.migration;
        updates.push(last);
        if (!seenAt.has(last.phase)) seenAt.set(last.phase, Date.now());
        for (const p of last.phases) if (!seenAt.has(p.phase)) seenAt.set(p.phase, Date.now());
        gotFirst(last);
        for (const w of [...waiters]) w();
      }
      return { last };
    } catch (err) {
      return { last, err };
    } finally {
      endedFlag = true;
      failFirst(new FailedPreconditionError("Migrate stream ended before the first record"));
      for (const w of [...waiters]) w();
    }
  })();
  const startedAt = Date.now();
  const m = await first;
  return {
    id: m.id,
    source,
    destination,
    startedAt,
    updates,
    seenAt,
    ended,
    phase(phase, timeoutMs = 120_000) {
      const find = () => updates.find((u) => u.phase === phase || u.phases.some((p) => p.phase === phase));
      const hit = find();
      if (hit) return Promise.resolve(hit);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiters.delete(w);
          reject(new DeadlineError(`phase ${Phase[phase]} not seen on the Migrate stream in ${timeoutMs} ms; saw ${[...seenAt.keys()].map((p) => Phase[p]).join(",")}`));
        }, timeoutMs);
        const w = () => {
          const h = find();
          if (h) {
            clearTimeout(timer);
            waiters.delete(w);
            resolve(h);
          } else if (endedFlag) {
            clearTimeout(timer);
            waiters.delete(w);
            reject(new FailedPreconditionError(`Migrate stream ended without phase ${Phase[phase]}; saw ${[...seenAt.keys()].map((p) => Phase[p]).join(",")}`));
          }
        };
        waiters.add(w);
      });
    },
  };
}

/** Polls GetMigration on `host` until `pred` holds (errors count as "not yet"). */
export async function waitMigration(lab: Lab, host: HostName, id: string, pred: (m: Migration) => boolean, what: string, timeoutMs = 60_000): Promise<Migration> {
  const until = Date.now() + timeoutMs;
  let last: Migration | undefined;
  let lastErr = "";
  for (;;) {
    try {
      last = (await lab.hosts[host].migrations.getMigration({ id }, { deadlineMs: 5000 })).migration;
      if (last && pred(last)) return last;
    } catch (err) {
      lastErr = errorMessage(err);
    }
    if (Date.now() > until) {
      throw new DeadlineError(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last ? `${Phase[last.phase]} ${JSON.stringify(last.error)}` : `no record (${lastErr})`}`);
    }
    await sleep(200);
  }
}

/** GetMigration until the record is final. */
export function waitFinal(lab: Lab, host: HostName, id: string, timeoutMs = 120_000): Promise<Migration> {
  return waitMigration(lab, host, id, (m) => isFinalPhase(m.phase), `migration ${id} final on host ${host}`, timeoutMs);
}

/**
 * Stops and starts `host`'s coordinator (SIGTERM, same config and stateDir)
 * and returns GetMigration(id) from the new process.
 */
export async function recordAfterRestart(lab: Lab, host: HostName, id: string): Promise<Migration> {
  const co = lab.hosts[host].coordinator;
  await co.stop();
  await co.restart();
  return waitMigration(lab, host, id, () => true, `GetMigration ${id} after a restart of host ${host}`, 20_000);
}

/**
 * After a migration ended (however it ended), makes the lab match reality:
 * if the destination QEMU runs the guest, the lab follows it there (stops
 * the old source QEMU); otherwise it drops the incoming QEMU. Then the shell
 * answers on the active host. Returns where the guest runs.
 */
export async function settle(lab: Lab): Promise<HostName> {
  const dst = lab.hosts[lab.other];
  const src = lab.hosts[lab.active];
  const dstState = dst.vm && !lab.hasExited(dst.vm) ? await qemuRunState(dst.vm) : "gone";
  const srcState = src.vm && !lab.hasExited(src.vm) ? await qemuRunState(src.vm) : "gone";
  if (dstState === "running" && srcState !== "running") {
    await lab.followGuest();
  } else {
    if (dst.vm) await dst.vm.stop();
    dst.vm = undefined;
    await lab.useHost(lab.active);
  }
  return lab.active;
}

/** Polls GetVm on `host` until the balloon target satisfies `pred`. */
export function waitBalloon(lab: Lab, host: HostName, pred: (targetBytes: number, vm: Vm) => boolean, what: string, timeoutMs = 30_000): Promise<Vm> {
  return lab.waitVm(host, (v) => v.balloon !== undefined && pred(Number(v.balloon.targetBytes), v), what, timeoutMs);
}

/** The guest answers on its serial shell. */
export async function guestAlive(shell: GuestShell, timeoutMs = 30_000): Promise<boolean> {
  const r = await shell.run("echo alive", { timeoutMs }).catch(() => undefined);
  return r?.output.trim() === "alive";
}

/** gRPC status code of a rejected call (grpc-js `code`, or the adapter's). */
export function grpcCode(err: unknown): number | undefined {
  const e = err as { code?: unknown; grpcCode?: unknown };
  if (typeof e?.code === "number") return e.code;
  if (typeof e?.grpcCode === "number") return e.grpcCode;
  return undefined;
}

/** Log lines of a coordinator that match `pred`, newest last. */
export function logLines(lab: Lab, host: HostName, pred: (l: Record<string, unknown>) => boolean): Record<string, unknown>[] {
  return lab.hosts[host].coordinator.logs.filter(pred);
}

/** The last `n` coordinator log lines, one JSON per line (for failure messages). */
export function logTail(lab: Lab, host: HostName, n = 40): string {
  return lab.hosts[host].coordinator.logs
    .slice(-n)
    .map((l) => JSON.stringify(l))
    .join("\n");
}

/** Kills the guest's background workload processes (node running workload.mjs). */
export async function stopGuestWorkloads(shell: GuestShell): Promise<void> {
  await shell.run("for p in $(pidof node); do grep -q workload /proc/$p/cmdline 2>/dev/null && kill -9 $p; done; true", { timeoutMs: 60_000 });
}

/** The balloon as QEMU itself reports it (`query-balloon` on the lab socket): the guest's real size. */
export async function qemuBalloonActual(vm: VmHandle | undefined): Promise<number | undefined> {
  if (!vm) return undefined;
  const r = await labQmp<{ actual?: number }>(vm, "query-balloon").catch(() => undefined);
  return typeof r?.actual === "number" ? r.actual : undefined;
}

/** Polls QEMU's own balloon size until `pred` holds; returns the last value (undefined: QEMU unreachable). */
export async function waitQemuBalloon(vm: VmHandle | undefined, pred: (actual: number) => boolean, timeoutMs = 60_000): Promise<number | undefined> {
  const until = Date.now() + timeoutMs;
  let last: number | undefined;
  for (;;) {
    last = await qemuBalloonActual(vm);
    if (last !== undefined && pred(last)) return last;
    if (Date.now() > until) return last;
    await sleep(500);
  }
}

/** `kill -9` a host's coordinator and start it again with the same config (ports, stateDir); see Lab.crashCoordinator. */
export function crashAndRestartCoordinator(lab: Lab, host: HostName, downMs = 500): Promise<void> {
  return lab.crashCoordinator(host, { betweenMs: downMs });
}

/** SIGKILL a host's QEMU and start a fresh one on the same sockets (a plain running guest unless `incoming`). */
export async function restartQemu(lab: Lab, host: HostName, opts: { incoming?: boolean } = {}): Promise<VmHandle> {
  const old = lab.hosts[host].vm;
  if (old) await killQemu(old);
  return lab.startQemuOn(host, opts.incoming ?? false);
}
