/**
 * The source side of a migration: a state machine that asks the destination
 * to get ready, runs PREPARE with the guest agent, drives QEMU through
 * pre-copy, post-copy or hybrid, streams phases to the agent, and restores
 * the balloon when anything goes wrong. The balloon never fails a migration:
 * PREPARE is bounded by a deadline, after which the migration goes ahead.
 */
import { randomUUID } from "node:crypto";
import type { PhaseAck } from "../gen/ballast/v1/agent_pb.js";
import { AgentState, BalloonReason, BalloonStrategy, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import type { PeerService } from "../gen/ballast/v1/peer_pb.js";
import { CancelledError, FailedPreconditionError, NotFoundError, errorMessage } from "../shared/errors.js";
import type { Client } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import type { AgentHub } from "./agent-hub.js";
import { isFinal, newRecord, statsFromProto, type MigrateParams, type MigrationRecord } from "./migration-record.js";
import type { MigrationStore } from "./migration-store.js";
import type { MigrateStats } from "./qemu.js";
import type { QmpEvent } from "./qmp-client.js";
import type { VmRuntime } from "./vm-runtime.js";

/** Options for {@link MigrationOrchestrator}. */
export interface OrchestratorOptions {
  vms: ReadonlyMap<string, VmRuntime>;
  hub: AgentHub;
  store: MigrationStore;
  /** Returns a PeerService client for a destination address (cached by the caller). */
  peer: (address: string) => Client<typeof PeerService>;
  logger: Logger;
  /** query-migrate polling interval while migrating. Default 500 ms. */
  pollMs?: number;
  /** Longest the source QMP may stay unreachable mid-migration before giving up. Default 30000 ms. */
  qmpLossMs?: number;
  /** Balloon timeline points kept per migration. Default 2000. */
  maxTimelinePoints?: number;
}

interface Running {
  record: MigrationRecord;
  vm: VmRuntime;
  abort: AbortController;
  migrateIssued: boolean;
}

/** The Hello capability of an agent whose PREPARE ack follows the inflation and the zeroing of its free memory. */
export const ZERO_FREE_CAPABILITY = "zero-free";

const TERMINAL_STATUS: Record<string, Phase> = { completed: Phase.COMPLETED, failed: Phase.FAILED, cancelled: Phase.CANCELLED };

/** Drives outgoing migrations of this host's VMs. */
export class MigrationOrchestrator {
  private readonly running = new Map<string, Running>();
  private readonly log: Logger;
  private readonly pollMs: number;
  private readonly qmpLossMs: number;
  private readonly maxTimeline: number;

  constructor(private readonly options: OrchestratorOptions) {
    this.log = options.logger.child({ component: "orchestrator" });
    this.pollMs = options.pollMs ?? 500;
    this.qmpLossMs = options.qmpLossMs ?? 30_000;
    this.maxTimeline = options.maxTimelinePoints ?? 2000;
    options.hub.on("ack", ({ vmName, ack }: { vmName: string; ack: PhaseAck }) => this.onAck(vmName, ack));
  }

  /**
   * Starts a migration. Checks what can be checked at once (VM known, not
   * already migrating) and returns the record; the rest runs in background
   * and is reported through the store.
   */
  start(params: MigrateParams): MigrationRecord {
    const vm = this.options.vms.get(params.vm);
    if (!vm) throw new NotFoundError(`no VM named ${JSON.stringify(params.vm)} on this host`);
    if (vm.migration && !isFinal({ phase: vm.migration.phase })) {
      throw new FailedPreconditionError(`VM ${params.vm} is already in migration ${vm.migration.id}`);
    }
    const record = newRecord(randomUUID(), params, Date.now());
    const run: Running = { record, vm, abort: new AbortController(), migrateIssued: false };
    this.running.set(record.id, run);
    this.refreshAgentState(run);
    vm.migration = { id: record.id, direction: "outgoing", phase: Phase.UNSPECIFIED, mode: params.mode, pass: 0, deadlineUnixMs: 0 };
    this.options.store.add(record);
    void this.run(run).finally(() => this.running.delete(record.id));
    return record;
  }

  /** Cancels a running migration; the balloon is restored by the run itself. */
  async cancel(id: string): Promise<MigrationRecord> {
    const record = this.options.store.get(id);
    const run = this.running.get(id);
    if (!run || isFinal(record)) throw new FailedPreconditionError(`migration ${id} is already ${Phase[record.phase]}`);
    run.abort.abort(new CancelledError(`migration ${id} cancelled by request`));
    if (run.migrateIssued) {
      try {
        await run.vm.qemu.migrateCancel();
      } catch (err) {
        this.log.warn({ id, err: errorMessage(err) }, "migrate_cancel failed");
      }
    }
    return record;
  }

  /** Waits until a migration reaches a final phase. */
  whenDone(id: string): Promise<MigrationRecord> {
    const record = this.options.store.get(id);
    if (isFinal(record)) return Promise.resolve(record);
    return new Promise((resolve) => {
      const on = (r: MigrationRecord) => {
        if (r.id === id && isFinal(r)) {
          this.options.store.off("update", on);
          resolve(r);
        }
      };
      this.options.store.on("update", on);
    });
  }

  private setPhase(run: Running, phase: Phase, pass = run.record.pass): void {
    const r = run.record;
    if (r.phase === phase && r.pass === pass) return;
    r.phase = phase;
    r.pass = pass;
    r.phases.push({ phase, pass, atMs: Date.now() });
    if (run.vm.migration?.id === r.id) {
      run.vm.migration.phase = phase;
      run.vm.migration.pass = pass;
    }
    this.refreshAgentState(run);
    this.options.store.changed(r);
    this.log.info({ id: r.id, vm: r.vm, phase: Phase[phase], pass }, "phase");
    void this.options.hub.sendPhase(r.vm, {
      migrationId: r.id,
      phase,
      mode: r.mode,
      pass,
      deadlineUnixMs: BigInt(run.vm.migration?.deadlineUnixMs ?? 0),
      error: r.error,
    });
  }

  private refreshAgentState(run: Running): void {
    const attached = this.options.hub.session(run.record.vm) !== undefined;
    if (!attached) run.record.agentState = AgentState.DISCONNECTED;
    else if (run.record.agentState === AgentState.DISCONNECTED || run.record.agentState === AgentState.UNSPECIFIED) {
      run.record.agentState = AgentState.CONNECTED;
    }
  }

  private onAck(vmName: string, ack: PhaseAck): void {
    for (const run of this.running.values()) {
      if (run.record.vm === vmName && run.record.id === ack.migrationId && ack.phase === Phase.PREPARE) {
        run.record.agentState = AgentState.READY;
        this.options.store.changed(run.record);
      }
    }
  }

  private noteBalloon(run: Running): void {
    const b = run.vm.balloon;
    if (!b) return;
    const r = run.record;
    r.balloonActualBytes = b.actualBytes ?? r.balloonActualBytes;
    r.balloonTargetBytes = b.targetBytes ?? r.balloonTargetBytes;
    const last = r.balloonTimeline[r.balloonTimeline.length - 1];
    if (!last || last.actualBytes !== r.balloonActualBytes || last.targetBytes !== r.balloonTargetBytes) {
      r.balloonTimeline.push({ atMs: Date.now(), actualBytes: r.balloonActualBytes, targetBytes: r.balloonTargetBytes });
      if (r.balloonTimeline.length > this.maxTimeline) r.balloonTimeline.splice(0, r.balloonTimeline.length - this.maxTimeline);
    }
  }

  private async run(run: Running): Promise<void> {
    const { record: r, vm, abort } = run;
    const log = this.log.child({ id: r.id, vm: r.vm });
    const onBalloon = () => {
      this.noteBalloon(run);
      this.options.store.changed(r);
    };
    vm.on("balloon", onBalloon);
    let finalPhase: Phase = Phase.FAILED;
    try {
      const ctl = await vm.ready();
      const state = await vm.refreshRunState();
      if (state !== "running") throw new FailedPreconditionError(`VM ${r.vm} is ${state}, not running`);
      r.ramBytes = vm.ramBytes;
      r.balloonTargetBeforeBytes = ctl.targetBytes ?? (await ctl.refresh());
      this.noteBalloon(run);
      this.refreshAgentState(run);

      const postcopy = r.mode === MigrationMode.POSTCOPY || r.mode === MigrationMode.HYBRID;
      const peer = this.options.peer(r.destination);
      const { uri } = await peer.prepareIncoming({ vm: r.vm, migrationId: r.id, mode: r.mode }, { deadlineMs: 20_000, signal: abort.signal });
      abort.signal.throwIfAborted();
      log.info({ uri }, "destination ready");
      await vm.qemu.setMigrationCapabilities({ events: true, "postcopy-ram": postcopy, "postcopy-blocktime": postcopy });
      // QEMU's post-copy phase is unthrottled by default (max-postcopy-bandwidth 0):
      // cap it too, so the link limit holds for the whole migration.
      await vm.qemu.setMigrationParameters({
        maxBandwidthBytesPerSec: r.maxBandwidthBytesPerSec,
        maxPostcopyBandwidthBytesPerSec: r.maxBandwidthBytesPerSec,
        downtimeLimitMs: r.downtimeLimitMs,
      });

      await this.prepare(run, log);
      abort.signal.throwIfAborted();

      finalPhase = await this.migrate(run, uri, log);
      if (finalPhase === Phase.COMPLETED) {
        r.sourceStats = await this.finalStats(vm);
        if (r.sourceStats) {
          // The last poll ran before completion; the record shows the final counts.
          r.transferredBytes = r.sourceStats.transferredBytes;
          r.remainingBytes = r.sourceStats.remainingBytes;
          r.totalBytes = r.sourceStats.totalBytes;
        }
        r.destinationStats = await this.destinationStats(peer, r.id, log);
      } else {
        r.sourceStats = await vm.qemu.queryMigrate().catch(() => undefined);
        r.error ||= r.sourceStats?.errorDesc || `migration ${finalPhase === Phase.CANCELLED ? "cancelled" : "failed"}`;
      }
    } catch (err) {
      finalPhase = abort.signal.aborted ? Phase.CANCELLED : Phase.FAILED;
      r.error = errorMessage(abort.signal.aborted ? abort.signal.reason : err);
      log.warn({ err: r.error }, "migration did not complete");
      if (run.migrateIssued && !abort.signal.aborted) {
        await vm.qemu.migrateCancel().catch(() => {});
      }
    } finally {
      vm.off("balloon", onBalloon);
    }
    if (finalPhase !== Phase.COMPLETED) await this.restoreBalloon(run, log);
    this.noteBalloon(run);
    this.setPhase(run, finalPhase);
    // The VM record keeps the final phase so a re-attaching agent learns how it ended.
  }

  /** PREPARE: ask the agent to give memory back, and maybe wait for it. */
  private async prepare(run: Running, log: Logger): Promise<void> {
    const { record: r, vm, abort } = run;
    const wantsPrepare = r.strategy === BalloonStrategy.INFLATE_THEN_MIGRATE || r.strategy === BalloonStrategy.OVERLAP;
    if (!wantsPrepare) return;
    if (!this.options.hub.session(r.vm)) {
      log.warn("no agent attached: skipping PREPARE");
      return;
    }
    const started = Date.now();
    const deadline = started + r.prepareDeadlineMs;
    if (vm.migration) vm.migration.deadlineUnixMs = deadline;
    r.agentState = AgentState.PREPARING;
    // An agent with "zero-free" acks PREPARE only after the inflation and after zeroing its free memory:
    // with inflate-then-migrate, that ack (bounded by the same deadline) is worth waiting for.
    const zeroFree =
      r.strategy === BalloonStrategy.INFLATE_THEN_MIGRATE && (this.options.hub.session(r.vm)?.hello.capabilities.includes(ZERO_FREE_CAPABILITY) ?? false);
    // Listen before sending: a fast agent may answer before we start waiting.
    const requested = this.waitForPrepareRequest(r, deadline, abort.signal);
    const acked = zeroFree ? this.waitForPrepareAck(r, deadline, abort.signal) : undefined;
    this.setPhase(run, Phase.PREPARE);
    if (r.strategy === BalloonStrategy.OVERLAP) {
      void requested.catch(() => {});
      return;
    }
    try {
      const got = await requested;
      abort.signal.throwIfAborted();
      if (got) {
        const ctl = vm.balloon;
        if (ctl) {
          const res = await ctl.waitForTarget({
            deadlineMs: Math.max(0, deadline - Date.now()),
            signal: abort.signal,
            onProgress: () => {
              this.noteBalloon(run);
              this.options.store.changed(r);
            },
          });
          log.info(res, "PREPARE inflation finished");
        }
        if (acked) {
          const waitStarted = Date.now();
          const ack = await acked.done;
          abort.signal.throwIfAborted();
          if (ack) log.info({ waitedMs: Date.now() - waitStarted }, "agent zeroed free memory and acked PREPARE");
          else log.warn({ waitedMs: Date.now() - waitStarted }, "no PREPARE ack from the agent before the deadline; migrating anyway");
        }
      } else {
        log.warn("agent sent no PREPARE target before the deadline; migrating anyway");
      }
    } finally {
      acked?.cancel();
    }
    r.prepareMs = Date.now() - started;
  }

  /**
   * Waits for one agent event of this VM: resolves true when `event` fires
   * with an argument `match` accepts; false at the deadline, when the agent
   * disconnects, on abort, or on `cancel()`.
   */
  private waitForAgent<T>(
    vmName: string,
    event: "ack" | "balloon-request",
    match: (e: T) => boolean,
    deadline: number,
    signal: AbortSignal,
  ): { done: Promise<boolean>; cancel: () => void } {
    const hub = this.options.hub;
    let cancel: () => void = () => {};
    const done = new Promise<boolean>((resolve) => {
      const finish = (v: boolean) => {
        clearTimeout(timer);
        hub.off(event, onEvent);
        hub.off("disconnected", onGone);
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      };
      const onEvent = (e: T) => {
        if (match(e)) finish(true);
      };
      const onGone = (name: string) => {
        if (name === vmName) finish(false);
      };
      const onAbort = () => finish(false);
      const timer = setTimeout(() => finish(false), Math.max(0, deadline - Date.now()));
      hub.on(event, onEvent);
      hub.on("disconnected", onGone);
      signal.addEventListener("abort", onAbort, { once: true });
      cancel = () => finish(false);
    });
    return { done, cancel };
  }

  /** The agent's PhaseAck(PREPARE) for this migration. */
  private waitForPrepareAck(r: MigrationRecord, deadline: number, signal: AbortSignal): { done: Promise<boolean>; cancel: () => void } {
    return this.waitForAgent<{ vmName: string; ack: PhaseAck }>(
      r.vm,
      "ack",
      (e) => e.vmName === r.vm && e.ack.migrationId === r.id && e.ack.phase === Phase.PREPARE,
      deadline,
      signal,
    );
  }

  /** An accepted PREPARE balloon request from the agent. */
  private waitForPrepareRequest(r: MigrationRecord, deadline: number, signal: AbortSignal): Promise<boolean> {
    return this.waitForAgent<{ vmName: string; reason: BalloonReason; accepted: boolean }>(
      r.vm,
      "balloon-request",
      (e) => e.vmName === r.vm && e.reason === BalloonReason.PREPARE && e.accepted,
      deadline,
      signal,
    ).done;
  }

  /** Issues `migrate` and follows it to a final status. */
  private async migrate(run: Running, uri: string, log: Logger): Promise<Phase> {
    const { record: r, vm, abort } = run;
    let postcopyRequested = false;
    let resolveStatus: (p: Phase) => void = () => {};
    const finished = new Promise<Phase>((res) => (resolveStatus = res));
    const startPostcopy = () => {
      if (postcopyRequested) return;
      postcopyRequested = true;
      vm.qemu.startPostcopy().then(
        () => log.info({ pass: r.pass }, "post-copy requested"),
        (err: unknown) => log.warn({ err: errorMessage(err) }, "migrate-start-postcopy failed"),
      );
    };
    const onEvent = (ev: QmpEvent) => {
      if (ev.event === "MIGRATION") {
        const status = String(ev.data.status ?? "");
        if (status === "active") {
          if (r.phase !== Phase.PRECOPY_PASS) this.setPhase(run, Phase.PRECOPY_PASS, Math.max(1, r.pass));
          if (r.mode === MigrationMode.POSTCOPY) startPostcopy();
        } else if (status === "postcopy-active") this.setPhase(run, Phase.POSTCOPY_ACTIVE);
        else if (status === "device" && r.phase !== Phase.SWITCHOVER && r.phase !== Phase.POSTCOPY_ACTIVE) this.setPhase(run, Phase.SWITCHOVER);
        const terminal = TERMINAL_STATUS[status];
        if (terminal !== undefined) resolveStatus(terminal);
      } else if (ev.event === "MIGRATION_PASS") {
        const pass = Number(ev.data.pass ?? 0);
        if (r.phase === Phase.PRECOPY_PASS || r.phase === Phase.PREPARE || r.phase === Phase.UNSPECIFIED) this.setPhase(run, Phase.PRECOPY_PASS, pass);
        if (r.mode === MigrationMode.HYBRID && pass > r.postcopyAfterPasses) startPostcopy();
      } else if (ev.event === "STOP" && r.phase === Phase.PRECOPY_PASS) {
        this.setPhase(run, Phase.SWITCHOVER);
      }
    };
    vm.on("qmp-event", onEvent);
    const started = Date.now();
    let lastOk = Date.now();
    try {
      await vm.qemu.migrate(uri);
      run.migrateIssued = true;
      if (abort.signal.aborted) await vm.qemu.migrateCancel().catch(() => {});
      for (;;) {
        const outcome = await Promise.race([finished, sleep(this.pollMs).then(() => undefined)]);
        if (outcome !== undefined) return outcome;
        try {
          const s = await vm.qemu.queryMigrate();
          lastOk = Date.now();
          r.transferredBytes = s.transferredBytes;
          r.remainingBytes = s.remainingBytes;
          r.totalBytes = s.totalBytes;
          this.noteBalloon(run);
          this.options.store.changed(r);
          // Events can be lost across a QMP reconnect; the polled status is the backstop.
          const terminal = TERMINAL_STATUS[s.status];
          if (terminal !== undefined) return terminal;
          if (s.status === "postcopy-active" && r.phase !== Phase.POSTCOPY_ACTIVE) this.setPhase(run, Phase.POSTCOPY_ACTIVE);
        } catch (err) {
          if (Date.now() - lastOk > this.qmpLossMs) throw new FailedPreconditionError(`lost QMP to the source for ${this.qmpLossMs} ms: ${errorMessage(err)}`);
        }
      }
    } finally {
      r.migrateMs = Date.now() - started;
      vm.off("qmp-event", onEvent);
    }
  }

  /** Final source numbers; re-asks when QEMU reports total-time 0 (seen on this rig). */
  private async finalStats(vm: VmRuntime): Promise<MigrateStats | undefined> {
    let s: MigrateStats | undefined;
    for (let i = 0; i < 5; i++) {
      s = await vm.qemu.queryMigrate().catch(() => s);
      if (s && s.totalTimeMs > 0) return s;
      await sleep(200);
    }
    return s;
  }

  private async destinationStats(peer: Client<typeof PeerService>, id: string, log: Logger): Promise<MigrateStats | undefined> {
    const until = Date.now() + 15_000;
    while (Date.now() < until) {
      try {
        const res = await peer.getIncoming({ migrationId: id }, { deadlineMs: 5000 });
        if (res.phase === Phase.COMPLETED && res.stats) return statsFromProto(res.stats);
        if (res.phase === Phase.FAILED) return undefined;
      } catch (err) {
        log.debug({ err: errorMessage(err) }, "destination stats not ready");
      }
      await sleep(300);
    }
    log.warn("destination did not report final stats");
    return undefined;
  }

  /** Puts the balloon back where it was before the migration. */
  private async restoreBalloon(run: Running, log: Logger): Promise<void> {
    const { record: r, vm } = run;
    const ctl = vm.balloon;
    if (!ctl || r.balloonTargetBeforeBytes === 0) return;
    try {
      const applied = await ctl.setTarget(r.balloonTargetBeforeBytes, { force: true, reason: "restore after failed or cancelled migration" });
      const res = await ctl.waitForTarget({ deadlineMs: 10_000 });
      log.info({ applied, actual: res.actualBytes, reached: res.reached }, "balloon restored");
    } catch (err) {
      // Never let restore errors hide the migration outcome; record them.
      r.error = `${r.error}; balloon restore failed: ${errorMessage(err)}`;
      log.error({ err: errorMessage(err) }, "balloon restore failed");
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

