/**
 * One supervisor per VM. It owns the VM's hypervisor driver, its balloon
 * controller, its agent session and its single migration slot, and it is the
 * thin I/O driver around the pure migration machine
 * (coordinator/migration-machine.ts): it turns driver events, agent messages,
 * peer answers and timer ticks into machine events, and runs the effects the
 * machine returns. Everything that crosses it is typed.
 *
 * It also holds the balloon's safety nets outside the machine:
 * - the lease: a balloon below the VM's max stays there only while an agent
 *   keeps talking; after `agentLeaseMs` of silence the supervisor deflates
 *   by itself (never on the source of a running outgoing migration, where
 *   the destination takes over);
 * - the guest-stats backstop: while ballooned, low available memory in the
 *   virtio-balloon stats deflates even if the agent is starved;
 * - cleanup after a migration that ended while the hypervisor was away.
 */
import type { Hello, PhaseAck } from "../gen/ballast/v1/agent_pb.js";
import { AgentState, BalloonReason, type MemorySample, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import type { PeerService } from "../gen/ballast/v1/peer_pb.js";
import { FailedPreconditionError, UnavailableError, errorMessage } from "../shared/errors.js";
import type { Client } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { LogLimiter, TokenBucket } from "../shared/rate-limit.js";
import { BACKOFF, retryPolicy, withTimeout } from "../shared/retry.js";
import { MiB } from "../shared/units.js";
import { BalloonController, type BalloonState } from "./balloon-controller.js";
import { guardBalloonRequest } from "./balloon-guard.js";
import type { MigrationDefaults, VmConfig } from "./config.js";
import { FINAL_STATUSES, type DriverEvent, type HypervisorDriver } from "./hypervisor.js";
import * as machine from "./migration-machine.js";
import type { MigrationEvent } from "./migration-events.js";
import { isFinal, statsFromProto, type MigrateParams, type MigrationRecord } from "./migration-record.js";
import type { MigrationStore } from "./migration-store.js";
import type { MigrateStats } from "./qemu.js";

/** What the supervisor needs of an attached agent session (the hub implements it). */
export interface AgentLink {
  readonly hello: Hello;
  readonly connectedAtMs: number;
  readonly peer: string;
  /** Sends a phase event; resolves false when it could not be delivered. */
  sendPhase(event: { migrationId: string; phase: Phase; mode: MigrationMode; pass: number; deadlineUnixMs: number; error: string }): Promise<boolean>;
  /** Pushes balloon state (the link rate-limits). */
  pushBalloon(state: { targetBytes: number; actualBytes: number; ramBytes: number }): void;
  close(reason: string): void;
}

/** Sees what the supervisor sees, without a say in it (coordinator/agent-channel.ts drives the agent's port from it). */
export interface VmObserver {
  /** Every driver event, before the supervisor acts on it. */
  driverEvent?(e: DriverEvent): void;
  /** An agent session was attached (after its Welcome and Policy). */
  agentAttached?(link: AgentLink): void;
}

/** A balloon request from the agent, as received. */
export interface AgentBalloonRequest {
  targetBytes: number;
  reason: BalloonReason;
  migrationId: string;
  detail: string;
}

/** Options for {@link VmSupervisor}. */
export interface VmSupervisorOptions {
  config: VmConfig;
  defaults: MigrationDefaults;
  driver: HypervisorDriver;
  store: MigrationStore;
  /** A PeerService client for a destination address. */
  peer: (address: string) => Client<typeof PeerService>;
  /** Address this host's QEMU listens on for incoming migrations. */
  incomingHost: string;
  logger: Logger;
  /** Machine timing; defaults in migration-machine.ts. */
  timing?: Partial<machine.MachineTiming>;
  /** Supervisor tick. Default 250 ms. */
  tickMs?: number;
  /** Backstop: deflate when the guest reports less available memory than this. Default 64 MiB. */
  backstopAvailableBytes?: number;
  /** How long to wait for the driver before a request fails as unavailable. Default 5000 ms. */
  readyTimeoutMs?: number;
  /** Clock; tests may pass a fake. */
  now?: () => number;
}

interface Slot {
  state: machine.MachineState;
  record: MigrationRecord;
  abort: AbortController;
  /** QEMU's `error-desc` from the final numbers, if it gave one. */
  qemuError?: string;
}

/** The live view of one VM, for GetVm and metrics. */
export interface VmView {
  name: string;
  driver: string;
  connected: boolean;
  runState: string;
  ramBytes: number;
  balloonTargetBytes: number | undefined;
  balloonActualBytes: number | undefined;
  floorBytes: number;
  maxBytes: number;
  agentConnected: boolean;
  lastSample: MemorySample | undefined;
  lastSampleAtMs: number;
  migrationId: string;
}

/** An agent may shrink its balloon this many times at once... */
export const SHRINK_BURST = 3;
/** ...and then this many times per second. */
export const SHRINK_PER_SECOND = 0.5;
/** Agent grows reach QEMU at most once per this many ms (coalesced to the newest target): a 250 ms pressure reaction. */
export const GROW_GAP_MS = 250;

/** How often the supervisor re-reads the balloon's actual size. */
const BALLOON_REFRESH_MS = 5000;

/** Supervises one VM. */
export class VmSupervisor {
  readonly name: string;
  readonly config: VmConfig;
  private readonly driver: HypervisorDriver;
  private readonly store: MigrationStore;
  private readonly log: Logger;
  private readonly now: () => number;
  private readonly timing: machine.MachineTiming;
  private readonly readyTimeoutMs: number;
  private readonly backstopBytes: number;
  private balloon: BalloonController | undefined;
  private agent: AgentLink | undefined;
  private lastSample: MemorySample | undefined;
  private lastSampleAtMs = 0;
  private lastAgentMessageAt = 0;
  /** When this host took charge of the VM's balloon (start, reconnect, arrival): the lease counts from here at the earliest. */
  private leaseStartAt: number;
  private slot: Slot | undefined;
  private pendingCleanup: { id: string; cancelQemu: boolean; restoreBalloonBytes: number } | undefined;
  private ticker: NodeJS.Timeout | undefined;
  private lastBackstopAt = 0;
  private leaseBusy = false;
  private cleanupRunning = false;
  private lastRefreshAt = 0;
  private readonly shrinkBudget: TokenBucket;
  private readonly prepareBudget: TokenBucket;
  private readonly refusedLog = new LogLimiter(10_000);
  private readonly refusedCount = new Map<string, number>();
  private readonly upWaiters = new Set<() => void>();
  private readonly observers = new Set<VmObserver>();

  constructor(private readonly options: VmSupervisorOptions) {
    this.config = options.config;
    this.name = options.config.name;
    this.driver = options.driver;
    this.store = options.store;
    this.log = options.logger.child({ vm: this.name });
    this.now = options.now ?? Date.now;
    this.timing = { ...machine.DEFAULT_TIMING, ...options.timing };
    this.readyTimeoutMs = options.readyTimeoutMs ?? 5000;
    this.backstopBytes = options.backstopAvailableBytes ?? 64 * MiB;
    this.leaseStartAt = this.now();
    this.shrinkBudget = new TokenBucket(SHRINK_BURST, SHRINK_PER_SECOND, this.now());
    this.prepareBudget = new TokenBucket(2, 1, this.now());
    this.driver.onEvent((e) => this.onDriverEvent(e));
  }

  /** Connects to the hypervisor, resumes unfinished migrations of this VM, and starts the tick. */
  start(): void {
    for (const r of this.store.unfinished()) {
      if (r.vm === this.name) this.resume(r);
    }
    this.driver.start();
    this.ticker = setInterval(() => this.tick(), this.options.tickMs ?? 250);
  }

  /** Stops the tick and closes the driver. Migrations in flight stay unfinished in the log and resume at the next start. */
  async stop(): Promise<void> {
    if (this.ticker) clearInterval(this.ticker);
    this.slot?.abort.abort(new UnavailableError("coordinator shutting down"));
    this.balloon?.dispose();
    this.agent?.close("coordinator shutting down");
    await this.driver.close();
  }

  /** Adds an observer; returns its removal. An observer that throws is logged and ignored. */
  observe(o: VmObserver): () => void {
    this.observers.add(o);
    return () => this.observers.delete(o);
  }

  private notify(call: (o: VmObserver) => void): void {
    for (const o of this.observers) {
      try {
        call(o);
      } catch (err) {
        this.log.error({ err: errorMessage(err) }, "VM observer threw");
      }
    }
  }

  // ---- views ---------------------------------------------------------------

  view(): VmView {
    const facts = this.driver.facts;
    const b = this.balloon;
    const connected = this.driver.connected && b !== undefined;
    return {
      name: this.name,
      driver: this.driver.kind,
      connected,
      // A dead QEMU's run state and balloon are not shown as if current.
      runState: connected && facts ? facts.runState : "unknown",
      ramBytes: facts?.ramBytes ?? 0,
      balloonTargetBytes: connected ? b?.targetBytes : undefined,
      balloonActualBytes: connected ? b?.actualBytes : undefined,
      floorBytes: b ? b.floorBytes : this.config.floorBytes,
      maxBytes: b ? b.maxBytes : this.config.maxBytes,
      agentConnected: this.agent !== undefined,
      lastSample: this.lastSample,
      lastSampleAtMs: this.lastSampleAtMs,
      migrationId: this.slot && !machine.isDone(this.slot.state) ? this.slot.record.id : "",
    };
  }

  /** The current migration phase, for an attaching agent's Welcome. */
  currentPhase(): { migrationId: string; phase: Phase; mode: MigrationMode; pass: number; deadlineUnixMs: number } | undefined {
    const s = this.slot?.state;
    if (!s) return undefined;
    return { migrationId: s.params.id, phase: s.phase, mode: s.params.mode, pass: s.pass, deadlineUnixMs: s.phase === Phase.PREPARE ? s.prepareDeadlineAt : 0 };
  }

  /** The balloon bounds in force, for the agent's Policy. */
  bounds(): { floorBytes: number; maxBytes: number } {
    const b = this.balloon;
    return b ? { floorBytes: b.floorBytes, maxBytes: b.maxBytes } : { floorBytes: this.config.floorBytes, maxBytes: this.config.maxBytes || this.driver.facts?.ramBytes || 0 };
  }

  // ---- migrations -----------------------------------------------------------

  /** Starts an outgoing migration; the record is durable when this returns. */
  startOutgoing(params: MigrateParams, id: string): MigrationRecord {
    if (this.slot && !machine.isDone(this.slot.state)) {
      throw new FailedPreconditionError(`VM ${this.name} is already in migration ${this.slot.record.id}`);
    }
    const record = this.store.create({ type: "created", atMs: this.now(), id, direction: "outgoing", params });
    const state = machine.outgoing({ id, mode: params.mode, strategy: params.strategy, prepareDeadlineMs: params.prepareDeadlineMs, postcopyAfterPasses: params.postcopyAfterPasses }, this.timing);
    this.slot = { state, record, abort: new AbortController() };
    this.recordAgentState(this.agent ? AgentState.CONNECTED : AgentState.DISCONNECTED);
    this.dispatch({ type: "begin", now: this.now() });
    return this.slot.record;
  }

  /** Cancels this VM's migration `id`; resolves with the final record. Refusals throw FailedPreconditionError with the reason. */
  async cancel(id: string): Promise<MigrationRecord> {
    const slot = this.slot;
    if (!slot || slot.record.id !== id || machine.isDone(slot.state)) {
      const r = this.store.get(id);
      throw new FailedPreconditionError(`migration ${id} is already ${Phase[r.phase] ?? "over"}`);
    }
    const verdict = machine.cancelVerdict(slot.state);
    if (!verdict.ok) throw new FailedPreconditionError(verdict.why);
    const done = this.whenDone(id);
    this.dispatch({ type: "cancel", now: this.now() });
    return done;
  }

  /** Resolves when migration `id` has its final event. */
  whenDone(id: string): Promise<MigrationRecord> {
    const r = this.store.get(id);
    if (isFinal(r)) return Promise.resolve(r);
    return new Promise((resolve) => {
      const on = (u: MigrationRecord) => {
        if (u.id === id && isFinal(u)) {
          this.store.off("update", on);
          resolve(u);
        }
      };
      this.store.on("update", on);
    });
  }

  /** Destination: gets this VM's QEMU (started to receive) ready and returns the URI to send to. */
  async prepareIncoming(id: string, mode: MigrationMode): Promise<string> {
    const old = this.slot;
    if (old && !machine.isDone(old.state) && old.state.params.direction === "incoming") {
      // An incoming migration whose source never started sending (cancelled or failed in PREPARE), or whose
      // QEMU has no migration any more (replaced by a fresh one), would hold this VM: a new PrepareIncoming
      // supersedes it. One still running in QEMU is not touched.
      let status = "unknown";
      try {
        status = (await this.driver.queryMigration()).status;
      } catch {
        // Not reachable: decided by what the machine knows.
      }
      const gone = status === "none" || FINAL_STATUSES.has(status);
      if (!old.state.seenActive || gone) {
        const done = this.whenDone(old.record.id);
        if (old.state.seenActive) this.dispatch({ type: "status", now: this.now(), status });
        else this.dispatch({ type: "failed", now: this.now(), error: `superseded by migration ${id}: the source never started sending this one` });
        await withTimeout(done, 10_000, () => new UnavailableError(`VM ${this.name}: the superseded incoming migration ${old.record.id} did not end`));
      }
    }
    if (this.slot && !machine.isDone(this.slot.state)) {
      throw new FailedPreconditionError(`VM ${this.name} here is already in migration ${this.slot.record.id}`);
    }
    // libvirt creates the incoming domain itself (incomingNeedsQemu false): there is no VM to check yet.
    if (this.driver.incomingNeedsQemu !== false) {
      await this.ready();
      const state = await this.driver.runState();
      if (state !== "inmigrate") {
        throw new FailedPreconditionError(`VM ${this.name} here is ${state}; the destination QEMU must be started with -incoming defer`);
      }
    }
    const postcopy = mode === MigrationMode.POSTCOPY || mode === MigrationMode.HYBRID;
    const uri = await this.driver.prepareIncoming({ postcopy }, this.options.incomingHost);
    const params: MigrateParams = {
      vm: this.name,
      destination: "",
      mode,
      strategy: 0,
      maxBandwidthBytesPerSec: 0,
      downtimeLimitMs: 0,
      prepareDeadlineMs: 0,
      postcopyAfterPasses: 0,
    };
    const now = this.now();
    const record = this.store.create({ type: "created", atMs: now, id, direction: "incoming", params });
    this.store.append(id, { type: "migrate-issued", atMs: now });
    const st = machine.incoming({ id, mode, strategy: 0, prepareDeadlineMs: 0, postcopyAfterPasses: 0 }, now, this.timing);
    this.slot = { state: st, record, abort: new AbortController() };
    this.store.append(id, { type: "phase", atMs: now, phase: Phase.PRECOPY_PASS, pass: 0 });
    this.log.info({ id, uri }, "incoming migration ready");
    return uri;
  }

  /** Destination: listens again for migration `id`, paused in post-copy; returns the URI the source resumes to. */
  async recoverIncoming(id: string): Promise<string> {
    const slot = this.slot;
    if (!slot || slot.record.id !== id || slot.state.params.direction !== "incoming" || machine.isDone(slot.state)) {
      throw new FailedPreconditionError(`migration ${id} is not incoming on VM ${this.name} here`);
    }
    await this.ready();
    const status = (await this.driver.queryMigration()).status;
    if (status !== "postcopy-paused") throw new FailedPreconditionError(`migration ${id} is ${status} here, not postcopy-paused`);
    const uri = await this.driver.recoverIncoming(this.options.incomingHost);
    this.log.info({ id, uri }, "listening to resume a paused post-copy migration");
    return uri;
  }

  private resume(r: MigrationRecord): void {
    const now = this.now();
    const st = machine.resumed(
      { id: r.id, direction: r.direction, mode: r.mode, strategy: r.strategy, prepareDeadlineMs: r.prepareDeadlineMs, postcopyAfterPasses: r.postcopyAfterPasses },
      { phase: r.phase, pass: r.pass, migrateIssued: r.migrateIssued, balloonBeforeBytes: r.balloonTargetBeforeBytes },
      now,
      this.timing,
    );
    this.slot = { state: st, record: r, abort: new AbortController() };
    this.log.warn({ id: r.id, phase: Phase[r.phase], direction: r.direction }, "resuming a migration interrupted by a coordinator restart");
    this.store.append(r.id, { type: "cleanup", atMs: now, action: "resume", ok: true, detail: "coordinator restarted; asking the hypervisor what happened meanwhile" });
  }

  // ---- the machine's driver -------------------------------------------------

  private dispatch(ev: machine.MachineEvent): void {
    const slot = this.slot;
    if (!slot || machine.isDone(slot.state)) return;
    const { state, effects } = machine.step(slot.state, ev);
    slot.state = state;
    for (const fx of effects) this.run(slot, fx);
  }

  private feed(slot: Slot, ev: machine.MachineEvent): void {
    if (this.slot === slot) this.dispatch(ev);
  }

  private append(slot: Slot, ev: MigrationEvent): void {
    try {
      slot.record = this.store.append(slot.record.id, ev);
    } catch (err) {
      this.log.error({ id: slot.record.id, err: errorMessage(err) }, "could not write the migration log");
    }
  }

  /** Runs one effect. Async effects report back through `feed`; none throws. */
  private run(slot: Slot, fx: machine.Effect): void {
    const id = slot.record.id;
    const params = slot.record;
    const signal = slot.abort.signal;
    const failed = (what: string) => (err: unknown) => this.feed(slot, { type: "failed", now: this.now(), error: `${what}: ${describeError(err)}` });
    switch (fx.type) {
      case "check-vm":
        void (async () => {
          const ctl = await this.ready();
          const runState = await this.driver.runState();
          const target = ctl.targetBytes ?? ctl.actualBytes ?? (await ctl.refresh());
          this.append(slot, { type: "vm", atMs: this.now(), ramBytes: this.driver.facts?.ramBytes ?? 0, balloonTargetBeforeBytes: target });
          this.feed(slot, { type: "vm-checked", now: this.now(), runState, balloonTargetBytes: target, agentAttached: this.agent !== undefined });
        })().catch(failed("the source VM cannot be inspected"));
        return;
      case "prepare-destination":
        this.options
          .peer(params.destination)
          .prepareIncoming({ vm: this.name, migrationId: id, mode: params.mode }, { deadlineMs: 20_000, signal })
          .then(({ uri }) => {
            this.log.info({ id, uri }, "destination ready");
            this.feed(slot, { type: "destination-ready", now: this.now(), uri });
          }, failed(`destination ${params.destination} is not ready`));
        return;
      case "configure":
        this.driver
          .configureMigration({
            postcopy: params.mode === MigrationMode.POSTCOPY || params.mode === MigrationMode.HYBRID,
            maxBandwidthBytesPerSec: params.maxBandwidthBytesPerSec,
            downtimeLimitMs: params.downtimeLimitMs,
          })
          .then(() => this.feed(slot, { type: "configured", now: this.now() }), failed("setting migration parameters failed"));
        return;
      case "phase": {
        this.log.info({ id, phase: Phase[fx.phase], pass: fx.pass }, "phase");
        if (!isFinalPhase(fx.phase)) this.append(slot, { type: "phase", atMs: this.now(), phase: fx.phase, pass: fx.pass });
        if (fx.phase === Phase.PREPARE) this.recordAgentState(this.agent ? AgentState.PREPARING : AgentState.DISCONNECTED);
        if (fx.phase === Phase.POSTCOPY_ACTIVE && slot.state.params.direction === "incoming") this.leaseStartAt = Math.max(this.leaseStartAt, this.now());
        void this.sendPhaseToAgent({ migrationId: id, phase: fx.phase, mode: params.mode, pass: fx.pass, deadlineUnixMs: fx.deadlineUnixMs, error: slot.state.outcome?.error ?? "" });
        return;
      }
      case "wait-balloon": {
        const ctl = this.balloon;
        if (!ctl || ctl.targetBytes === undefined) {
          this.feed(slot, { type: "balloon-settled", now: this.now() });
          return;
        }
        ctl
          .waitForTarget({ deadlineMs: Math.max(0, fx.untilMs - this.now()), signal, onProgress: () => this.recordBalloon(slot) })
          .then(
            (res) => {
              this.log.info(res, "PREPARE inflation finished");
              this.feed(slot, { type: "balloon-settled", now: this.now() });
            },
            // Aborted or the controller went away: the deadline tick moves the machine on.
            (err: unknown) => this.log.debug({ err: errorMessage(err) }, "PREPARE wait ended early"),
          );
        return;
      }
      case "migrate":
        this.driver.startMigration(fx.uri).then(() => this.feed(slot, { type: "migrate-accepted", now: this.now() }), failed("QEMU refused to start the migration"));
        return;
      case "start-postcopy":
        this.driver.startPostcopy().then(
          () => this.log.info({ id, pass: slot.state.pass }, "post-copy requested"),
          (err: unknown) => this.log.warn({ id, err: errorMessage(err) }, "migrate-start-postcopy failed"),
        );
        return;
      case "cancel-qemu":
        this.driver.cancelMigration().catch((err: unknown) => this.log.warn({ id, err: errorMessage(err) }, "migrate_cancel failed"));
        return;
      case "poll":
      case "query-status":
        this.driver.queryMigration().then(
          (s) => {
            this.recordProgress(slot, s);
            this.feed(slot, { type: "status", now: this.now(), status: s.status });
          },
          (err: unknown) => this.log.debug({ id, err: errorMessage(err) }, "query-migrate failed"),
        );
        return;
      case "migrate-issued":
        this.append(slot, { type: "migrate-issued", atMs: this.now() });
        return;
      case "timing":
        this.append(slot, { type: "timing", atMs: this.now(), prepareMs: fx.prepareMs, migrateMs: fx.migrateMs });
        return;
      case "collect-stats":
        void this.collectStats(slot).finally(() => this.feed(slot, { type: "stats-done", now: this.now() }));
        return;
      case "restore-balloon":
        void this.restoreBalloon(slot, fx.targetBytes).finally(() => this.feed(slot, { type: "restored", now: this.now() }));
        return;
      case "paused":
        this.append(slot, {
          type: "cleanup",
          atMs: this.now(),
          action: fx.paused ? "postcopy-paused" : "postcopy-recovered",
          ok: !fx.paused,
          detail: fx.paused ? "the migration stream broke during post-copy: the guest is frozen until the stream is recovered" : "post-copy runs again",
        });
        this.log[fx.paused ? "error" : "info"]({ id, direction: slot.state.params.direction }, fx.paused ? "post-copy paused: migration stream lost" : "post-copy recovered");
        // A frozen guest cannot renew its lease: count it from the recovery, not from the pause.
        if (!fx.paused) this.leaseStartAt = Math.max(this.leaseStartAt, this.now());
        return;
      case "recover":
        this.options
          .peer(params.destination)
          .recoverIncoming({ migrationId: id }, { deadlineMs: 10_000, signal })
          .then(async ({ uri }) => {
            await this.driver.resumeMigration(uri);
            this.log.info({ id, uri }, "post-copy resume requested");
          })
          .catch((err: unknown) => this.log.warn({ id, err: describeError(err) }, "post-copy recovery attempt failed; will retry"));
        return;
      case "cleanup-later":
        this.pendingCleanup = { id, cancelQemu: fx.cancelQemu, restoreBalloonBytes: fx.restoreBalloonBytes };
        return;
      case "final": {
        // QEMU's own words (error-desc, read with the final numbers) say why better than "QEMU reports the migration failed".
        const error = slot.qemuError && fx.phase !== Phase.COMPLETED && !fx.error.includes(slot.qemuError) ? `${fx.error}: ${slot.qemuError}` : fx.error;
        this.append(slot, { type: "final", atMs: this.now(), phase: fx.phase, error });
        this.log[fx.phase === Phase.COMPLETED ? "info" : "warn"]({ id, phase: Phase[fx.phase], error: fx.error }, "migration ended");
        if (fx.phase === Phase.COMPLETED && slot.state.params.direction === "incoming") this.leaseStartAt = Math.max(this.leaseStartAt, this.now());
        slot.abort.abort(new UnavailableError("migration ended"));
        return;
      }
    }
  }

  private async collectStats(slot: Slot): Promise<void> {
    const outcome = slot.state.outcome;
    if (!outcome) return;
    const out = slot.state.params.direction === "outgoing";
    try {
      // QEMU 7.2 sometimes answers the first `completed` query with total-time 0: ask again shortly.
      const policy = retryPolicy(BACKOFF.poll, 4);
      const s = await policy.execute(async () => {
        const st = await this.driver.queryMigration();
        if (outcome.phase === Phase.COMPLETED && out && st.totalTimeMs === 0) throw new UnavailableError("total-time 0");
        return st;
      });
      this.append(slot, { type: "stats", atMs: this.now(), side: out ? "source" : "destination", stats: s });
      if (s.errorDesc) slot.qemuError = s.errorDesc;
      if (out && outcome.phase === Phase.COMPLETED) this.recordProgress(slot, s);
    } catch (err) {
      this.log.debug({ err: errorMessage(err) }, "final query-migrate failed");
    }
    if (!out || outcome.phase !== Phase.COMPLETED) return;
    try {
      const peer = this.options.peer(slot.record.destination);
      const policy = retryPolicy(BACKOFF.poll, 20);
      const res = await policy.execute(async () => {
        const r = await peer.getIncoming({ migrationId: slot.record.id }, { deadlineMs: 3000 });
        if (r.phase !== Phase.COMPLETED && r.phase !== Phase.FAILED) throw new UnavailableError("destination not final yet");
        return r;
      });
      if (res.phase === Phase.COMPLETED && res.stats) this.append(slot, { type: "stats", atMs: this.now(), side: "destination", stats: statsFromProto(res.stats) });
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "destination did not report final stats");
    }
  }

  private async restoreBalloon(slot: Slot, targetBytes: number): Promise<void> {
    const ok = await this.applyRestore(targetBytes, "restore after a failed or cancelled migration");
    this.append(slot, { type: "cleanup", atMs: this.now(), action: "restore-balloon", ok: ok.ok, detail: ok.detail });
    // The hypervisor went away in the meantime: try again when it is back.
    if (!ok.ok) this.pendingCleanup = { id: slot.record.id, cancelQemu: false, restoreBalloonBytes: targetBytes };
    this.recordBalloon(slot);
  }

  private async applyRestore(targetBytes: number, reason: string): Promise<{ ok: boolean; detail: string }> {
    try {
      const ctl = await this.ready();
      const applied = await ctl.setTarget(targetBytes, { force: true, reason });
      const res = await ctl.waitForTarget({ deadlineMs: 5000 });
      this.log.info({ applied, actual: res.actualBytes, reached: res.reached }, "balloon restored");
      return { ok: true, detail: `target ${applied} bytes, actual ${res.actualBytes} bytes${res.reached ? "" : " (still moving)"}` };
    } catch (err) {
      this.log.error({ err: errorMessage(err) }, "balloon restore failed");
      return { ok: false, detail: errorMessage(err) };
    }
  }

  private recordProgress(slot: Slot, s: MigrateStats): void {
    const r = slot.record;
    if (r.transferredBytes !== s.transferredBytes || r.remainingBytes !== s.remainingBytes || r.totalBytes !== s.totalBytes) {
      this.append(slot, { type: "progress", atMs: this.now(), transferredBytes: s.transferredBytes, remainingBytes: s.remainingBytes, totalBytes: s.totalBytes });
    }
    this.recordBalloon(slot);
  }

  private recordBalloon(slot: Slot): void {
    const b = this.balloon;
    if (!b) return;
    const target = b.targetBytes ?? slot.record.balloonTargetBytes;
    const actual = b.actualBytes ?? slot.record.balloonActualBytes;
    if (target === slot.record.balloonTargetBytes && actual === slot.record.balloonActualBytes) return;
    this.append(slot, { type: "balloon", atMs: this.now(), targetBytes: target, actualBytes: actual });
  }

  private recordAgentState(state: AgentState): void {
    const slot = this.slot;
    if (!slot || machine.isDone(slot.state) || slot.record.agentState === state) return;
    this.append(slot, { type: "agent", atMs: this.now(), agentState: state });
  }

  // ---- the hypervisor ---------------------------------------------------------

  /** The balloon controller once the driver is up; UnavailableError after `readyTimeoutMs`. */
  private async ready(): Promise<BalloonController> {
    if (this.driver.connected && this.balloon) return this.balloon;
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => {
        this.upWaiters.delete(done);
        reject(new UnavailableError(`VM ${this.name}: the ${this.driver.kind} connection is down`));
      }, this.readyTimeoutMs);
      const done = () => {
        clearTimeout(t);
        resolve();
      };
      this.upWaiters.add(done);
    });
    if (!this.balloon) throw new UnavailableError(`VM ${this.name}: the ${this.driver.kind} connection is down`);
    return this.balloon;
  }

  private onDriverEvent(e: DriverEvent): void {
    const now = this.now();
    this.notify((o) => o.driverEvent?.(e));
    switch (e.type) {
      case "up": {
        const maxBytes = this.config.maxBytes === 0 ? e.facts.ramBytes : Math.min(this.config.maxBytes, e.facts.ramBytes);
        // A reconnect may reach a different QEMU process (a restart, a new incoming instance): balloon state starts afresh.
        this.balloon?.dispose();
        this.balloon = new BalloonController(this.driver, { floorBytes: Math.min(this.config.floorBytes, maxBytes), maxBytes, logger: this.log });
        this.balloon.learnActual(e.facts.balloonActualBytes);
        this.balloon.on("state", (s: BalloonState) => this.onBalloonState(s));
        this.leaseStartAt = Math.max(this.leaseStartAt, now);
        for (const w of [...this.upWaiters]) w();
        this.upWaiters.clear();
        this.dispatch({ type: "hypervisor-up", now });
        void this.runPendingCleanup();
        return;
      }
      case "down":
        this.balloon?.dispose();
        this.balloon = undefined;
        this.dispatch({ type: "hypervisor-down", now, error: e.error });
        return;
      case "migration-status":
        this.dispatch({ type: "status", now, status: e.status });
        return;
      case "migration-pass":
        this.dispatch({ type: "pass", now, pass: e.pass });
        return;
      case "stop":
        this.dispatch({ type: "guest-stopped", now });
        return;
      case "resume":
        if (this.slot?.state.params.direction === "incoming") this.leaseStartAt = Math.max(this.leaseStartAt, now);
        // The balloon arrives with the guest: what was read while `inmigrate` is stale.
        this.balloon?.refresh().catch(() => {});
        return;
      case "balloon-change":
        this.balloon?.learnActual(e.actualBytes);
        return;
      case "agent-port":
        // The agent's port is the channel's business (observers); nothing here depends on it.
        return;
    }
  }

  private onBalloonState(s: BalloonState): void {
    const facts = this.driver.facts;
    if (this.agent && s.actualBytes !== undefined && facts) {
      this.agent.pushBalloon({ targetBytes: s.targetBytes ?? s.actualBytes, actualBytes: s.actualBytes, ramBytes: facts.ramBytes });
    }
  }

  /** Work left by a migration that ended while the hypervisor was away. */
  private async runPendingCleanup(): Promise<void> {
    const c = this.pendingCleanup;
    if (!c || this.cleanupRunning) return;
    this.cleanupRunning = true;
    try {
      // Kept until it succeeded: a drop in the middle leaves it for the next reconnect.
      if (await this.cleanupOnce(c)) {
        if (this.pendingCleanup === c) this.pendingCleanup = undefined;
      }
    } finally {
      this.cleanupRunning = false;
    }
  }

  /** One attempt at a pending cleanup; true when nothing is left to do. */
  private async cleanupOnce(c: { id: string; cancelQemu: boolean; restoreBalloonBytes: number }): Promise<boolean> {
    const note = (action: string, ok: boolean, detail: string) => {
      try {
        this.store.append(c.id, { type: "cleanup", atMs: this.now(), action, ok, detail });
      } catch (err) {
        this.log.error({ err: errorMessage(err) }, "could not write the migration log");
      }
    };
    let status: string;
    try {
      status = (await this.driver.queryMigration()).status;
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "query-migrate failed during cleanup; will retry at the next reconnect");
      return false;
    }
    if (c.cancelQemu && (status === "active" || status === "setup" || status === "pre-switchover" || status === "device")) {
      try {
        await this.driver.cancelMigration();
        note("cancel-qemu-migration", true, `QEMU's migration was ${status}; cancelled`);
        c.cancelQemu = false;
      } catch (err) {
        note("cancel-qemu-migration", false, errorMessage(err));
        return false;
      }
    } else if (c.cancelQemu && (status === "completed" || status.startsWith("postcopy"))) {
      // The guest moved on while we were away: it runs on the destination, whose coordinator owns its balloon now.
      note("found-migrated", true, `the source QEMU reports ${status}: the guest left this host while the hypervisor was unreachable`);
      return true;
    }
    if (c.restoreBalloonBytes > 0) {
      const res = await this.applyRestore(c.restoreBalloonBytes, "restore after a migration that ended while the hypervisor was away");
      note("restore-balloon", res.ok, res.detail);
      return res.ok;
    }
    return true;
  }

  // ---- the agent ----------------------------------------------------------------

  /** Sends a phase event to the attached agent; false when none is attached or delivery failed. */
  sendPhaseToAgent(e: Parameters<AgentLink["sendPhase"]>[0]): Promise<boolean> {
    return this.agent ? this.agent.sendPhase(e) : Promise.resolve(false);
  }

  /** Attaches an agent session. Returns the session it displaced, if any. */
  attachAgent(link: AgentLink): AgentLink | undefined {
    const previous = this.agent;
    this.agent = link;
    this.lastAgentMessageAt = this.now();
    this.recordAgentState(AgentState.CONNECTED);
    const facts = this.driver.facts;
    const b = this.balloon;
    if (b?.actualBytes !== undefined && facts) link.pushBalloon({ targetBytes: b.targetBytes ?? b.actualBytes, actualBytes: b.actualBytes, ramBytes: facts.ramBytes });
    this.notify((o) => o.agentAttached?.(link));
    return previous;
  }

  /** Detaches `link` if it is still the VM's session. */
  detachAgent(link: AgentLink): void {
    if (this.agent !== link) return;
    this.agent = undefined;
    this.recordAgentState(AgentState.DISCONNECTED);
    this.dispatch({ type: "agent-detached", now: this.now() });
  }

  /** A sample from the agent (already sanity-checked by the hub). */
  agentSample(link: AgentLink, sample: MemorySample): void {
    if (this.agent !== link) return;
    this.lastSample = sample;
    this.lastSampleAtMs = this.now();
    this.lastAgentMessageAt = this.now();
  }

  /** Any other message from the agent renews its lease. */
  agentAlive(link: AgentLink): void {
    if (this.agent === link) this.lastAgentMessageAt = this.now();
  }

  /** An agent's PhaseAck. */
  agentAck(link: AgentLink, ack: PhaseAck): void {
    if (this.agent !== link) return;
    this.lastAgentMessageAt = this.now();
    const slot = this.slot;
    if (slot && slot.record.id === ack.migrationId && ack.phase === Phase.PREPARE) {
      this.recordAgentState(AgentState.READY);
      // An ack whose target gives nothing back means no PREPARE request will come: migrate now, not at the deadline.
      const held = this.balloon?.targetBytes ?? this.balloon?.actualBytes;
      const target = Number(ack.targetBytes);
      if (held !== undefined && !(target > 0 && target < held)) this.dispatch({ type: "prepare-declined", now: this.now() });
    }
  }

  /**
   * A balloon request from the agent: guarded by the VM's state, clamped, and
   * applied. Resolves with the verdict, for the caller's log and tests.
   */
  async agentBalloonRequest(link: AgentLink, req: AgentBalloonRequest): Promise<{ accepted: boolean; appliedBytes: number; why: string }> {
    if (this.agent !== link) return { accepted: false, appliedBytes: 0, why: "session replaced" };
    this.lastAgentMessageAt = this.now();
    const ctl = this.balloon;
    if (!ctl || !this.driver.connected) return { accepted: false, appliedBytes: 0, why: `${this.driver.kind} not connected` };
    const s = this.slot && !machine.isDone(this.slot.state) ? this.slot.state : undefined;
    const verdict = guardBalloonRequest(
      { targetBytes: req.targetBytes, reason: req.reason, migrationId: req.migrationId },
      {
        floorBytes: ctl.floorBytes,
        maxBytes: ctl.maxBytes,
        currentTargetBytes: ctl.targetBytes ?? ctl.actualBytes,
        migration: s ? { id: s.params.id, phase: s.phase, direction: s.params.direction } : undefined,
      },
    );
    if (!verdict.accept) return this.refuse(req, verdict.why);
    // The agent's budget (a guest is untrusted): identical targets cost nothing; shrinks spend a token
    // bucket; grows are never refused (safety wins) but reach QEMU at most once per GROW_GAP_MS,
    // coalesced to the newest target, so 5000 requests cannot become 5000 QMP commands.
    const current = ctl.targetBytes ?? ctl.actualBytes;
    if (current !== undefined && verdict.targetBytes === current) return { accepted: true, appliedBytes: current, why: "" };
    const grows = current === undefined || verdict.targetBytes > current;
    // PREPARE (accepted by the guard only in its phase, for the migration named) has its own budget, so
    // steady-state shrinks just before a migration cannot starve the one request the migration waits for.
    const prepare = req.reason === BalloonReason.PREPARE;
    if (!grows && !(prepare ? this.prepareBudget : this.shrinkBudget).take(this.now())) {
      return this.refuse(
        req,
        prepare
          ? "rate limited: at most 2 PREPARE targets at once and 1 per second from the agent"
          : `rate limited: at most ${SHRINK_BURST} balloon shrinks at once and ${SHRINK_PER_SECOND} per second from the agent`,
      );
    }
    try {
      const applied = await ctl.setTarget(verdict.targetBytes, {
        force: !grows && req.reason === BalloonReason.PREPARE,
        minIntervalMs: grows ? GROW_GAP_MS : undefined,
        reason: BalloonReason[req.reason],
      });
      this.log.info({ requested: req.targetBytes, applied, reason: BalloonReason[req.reason], detail: req.detail, phase: s ? Phase[s.phase] : undefined }, "balloon target set");
      if (s && req.reason === BalloonReason.PREPARE && req.migrationId === s.params.id) this.dispatch({ type: "prepare-requested", now: this.now() });
      if (this.slot && s) this.recordBalloon(this.slot);
      return { accepted: true, appliedBytes: applied, why: "" };
    } catch (err) {
      return this.refuse(req, errorMessage(err));
    }
  }

  /** Counts a refused request and logs it, at most one line per kind of refusal per 10 s. */
  private refuse(req: AgentBalloonRequest, why: string): { accepted: false; appliedBytes: 0; why: string } {
    const kind = `${BalloonReason[req.reason] ?? req.reason}: ${why.replace(/\d+/g, "N")}`;
    this.refusedCount.set(kind, (this.refusedCount.get(kind) ?? 0) + 1);
    const suppressed = this.refusedLog.admit(kind, this.now());
    if (suppressed !== undefined) this.log.warn({ targetBytes: req.targetBytes, reason: BalloonReason[req.reason], why, suppressed }, "balloon request refused");
    return { accepted: false, appliedBytes: 0, why };
  }

  /** Refused agent balloon requests since start, by kind (for metrics and tests). */
  refusedRequests(): ReadonlyMap<string, number> {
    return this.refusedCount;
  }

  // ---- the tick: machine deadlines, the lease, the backstop -----------------------

  private tick(): void {
    const now = this.now();
    this.dispatch({ type: "tick", now });
    // BALLOON_CHANGE is throttled and can be missed across a reconnect or an arrival: re-read now and then.
    if (now - this.lastRefreshAt >= BALLOON_REFRESH_MS && this.driver.connected) {
      this.lastRefreshAt = now;
      this.balloon?.refresh().catch(() => {});
    }
    void this.checkLease(now);
  }

  private async checkLease(now: number): Promise<void> {
    const ctl = this.balloon;
    const facts = this.driver.facts;
    if (!ctl || !facts || this.leaseBusy || !this.driver.connected) return;
    // Only a guest that runs here: not a source that finished (postmigrate), not an incoming one still in pre-copy.
    if (facts.runState !== "running" && facts.runState !== "paused") return;
    const s = this.slot && !machine.isDone(this.slot.state) ? this.slot.state : undefined;
    if (s && s.params.direction === "outgoing") return;
    const held = ctl.targetBytes ?? ctl.actualBytes;
    if (held === undefined || held >= ctl.maxBytes - 8 * MiB) return;
    const silentFor = now - Math.max(this.lastAgentMessageAt, this.leaseStartAt);
    let why = "";
    if (silentFor >= this.options.defaults.agentLeaseMs) why = `agent silent for ${silentFor} ms (lease ${this.options.defaults.agentLeaseMs} ms)`;
    else if (now - this.lastBackstopAt >= 1000) {
      this.lastBackstopAt = now;
      try {
        const gs = await this.driver.guestMemoryStats();
        if (gs?.availableBytes !== undefined && gs.lastUpdateS > 0 && gs.availableBytes < this.backstopBytes) {
          why = `guest reports ${Math.round(gs.availableBytes / MiB)} MiB available (backstop below ${Math.round(this.backstopBytes / MiB)} MiB)`;
        }
      } catch {
        // No stats: the lease still holds.
      }
    }
    if (!why) return;
    this.leaseBusy = true;
    try {
      const applied = await ctl.setTarget(ctl.maxBytes, { force: true, reason: why.startsWith("agent") ? "LEASE" : "BACKSTOP" });
      this.log.warn({ applied, why, reason: why.startsWith("agent") ? "LEASE" : "BACKSTOP", phase: s ? Phase[s.phase] : undefined }, "balloon deflated by the host");
      this.lastAgentMessageAt = now; // one deflate per silence, not one per tick
    } catch (err) {
      this.log.warn({ err: errorMessage(err) }, "host deflate failed");
    } finally {
      this.leaseBusy = false;
    }
  }
}

function isFinalPhase(p: Phase): boolean {
  return p === Phase.COMPLETED || p === Phase.FAILED || p === Phase.CANCELLED;
}

/**
 * A pre-move failure's cause for the record, ending in its reason in
 * parentheses, e.g. "... -incoming defer (FAILED_PRECONDITION)": ballastctl
 * reads it back to exit with the refusal's code (README "CLI"). A peer's
 * gRPC error shows its details without grpc-js internals (the "9
 * FAILED_PRECONDITION: " prefix, an empty "Resolution note").
 */
function describeError(err: unknown): string {
  const GRPC_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];
  const clean = (text: string) =>
    text
      .replace(/^\d{1,2} [A-Z_]+: /, "")
      .replace(/\.?\s*Resolution note:\s*$/, "")
      .replace(/Resolution note: /, "resolution: ")
      .replace(/Last error: (?:Error: )?/, "last error: ")
      .replace(/^No connection established\b/, "no connection established")
      .trim();
  if (typeof err === "object" && err !== null) {
    const e = err as { code?: unknown; details?: unknown; message?: unknown };
    if (typeof e.code === "number" && typeof e.details === "string") {
      const text = clean(e.details || errorMessage(err)).replace(/^peer: /, "");
      const name = GRPC_NAMES[e.code];
      return name && e.code !== 0 ? `${text} (${name})` : text;
    }
    if (typeof e.code === "string" && /^[a-z][a-z-]*$/.test(e.code)) {
      return `${clean(errorMessage(err))} (${e.code.toUpperCase().replace(/-/g, "_")})`;
    }
  }
  return clean(errorMessage(err));
}
