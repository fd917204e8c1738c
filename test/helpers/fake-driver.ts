/**
 * A scriptable {@link HypervisorDriver} for supervisor and hub tests: the
 * test brings it up and down, sets the run state, the query-migrate answers
 * and the guest stats, and reads back every call it got. Its balloon moves
 * toward the last target at `balloonRateBytesPerSec` (Infinity: at once),
 * measured on the real clock, so BalloonController's polling sees it move.
 *
 * Like a real driver it fails commands with UnavailableError while down and
 * reports `facts` only while up (unless `keepFactsWhenDown`, to model a
 * driver that caches stale facts).
 */
import type { DriverEvent, GuestMemoryStats, HypervisorDriver, MigrationSettings, VmFacts } from "../../coordinator/hypervisor.js";
import type { MigrateStats } from "../../coordinator/qemu.js";
import { UnavailableError } from "../../shared/errors.js";
import { MiB } from "../../shared/units.js";

/** One recorded driver call. */
export interface DriverCall {
  method: string;
  args: unknown[];
  /** performance.now() when the call arrived. */
  atMs: number;
  /** The balloon's actual size when the call arrived. */
  actualBytes: number;
}

/** A query-migrate answer with every counter 0 except what is given. */
export function migrateStats(status: string, o: Partial<MigrateStats> = {}): MigrateStats {
  return {
    status,
    totalTimeMs: status === "completed" ? 1234 : 0,
    downtimeMs: status === "completed" ? 12 : 0,
    setupTimeMs: 3,
    transferredBytes: 0,
    remainingBytes: 0,
    totalBytes: 0,
    duplicatePages: 0,
    normalPages: 0,
    normalBytes: 0,
    dirtySyncCount: 0,
    postcopyRequests: 0,
    precopyBytes: 0,
    postcopyBytes: 0,
    postcopyBlocktimeMs: 0,
    mbps: 0,
    errorDesc: "",
    raw: { status },
    ...o,
  };
}

/** Options for {@link FakeDriver}. */
export interface FakeDriverOptions {
  ramBytes?: number;
  runState?: string;
  /** The balloon's size when the driver first comes up. Default: the RAM size. */
  balloonActualBytes?: number;
  /** How fast the guest follows a balloon target. Default Infinity (at once). */
  balloonRateBytesPerSec?: number;
  /** Whether `start()` brings the driver up (on the next macrotask). Default true. */
  upOnStart?: boolean;
  /** Keep `facts` after `down()` (a driver with stale facts). Default false. */
  keepFactsWhenDown?: boolean;
}

/** Scriptable hypervisor driver. */
export class FakeDriver implements HypervisorDriver {
  readonly kind = "fake";
  readonly calls: DriverCall[] = [];
  ramBytes: number;
  runStateValue: string;
  balloonRateBytesPerSec: number;
  upOnStart: boolean;
  keepFactsWhenDown: boolean;
  /** What query-migrate answers; a function is called on every query. */
  migration: MigrateStats | (() => MigrateStats) = migrateStats("none");
  /** What `cancelMigration` does to `migration` (QEMU confirms a cancel). Default: status becomes "cancelled". */
  onCancel: (d: FakeDriver) => void = (d) => {
    d.migration = migrateStats("cancelled");
  };
  /** What guestMemoryStats answers. */
  guestStats: GuestMemoryStats | undefined = undefined;
  /** Per-method failures: the named call throws this. */
  readonly failures = new Map<string, Error>();
  /** The URI prepareIncoming returns. */
  incomingUri = "tcp:127.0.0.1:4444";

  private listener: (e: DriverEvent) => void = () => {};
  private up_ = false;
  private factsValue: VmFacts | undefined;
  private started = false;
  private closed = false;
  private balloonFrom: number;
  private balloonTarget: number;
  private balloonSince = performance.now();

  constructor(o: FakeDriverOptions = {}) {
    this.ramBytes = o.ramBytes ?? 1024 * MiB;
    this.runStateValue = o.runState ?? "running";
    this.balloonRateBytesPerSec = o.balloonRateBytesPerSec ?? Number.POSITIVE_INFINITY;
    this.upOnStart = o.upOnStart ?? true;
    this.keepFactsWhenDown = o.keepFactsWhenDown ?? false;
    this.balloonFrom = o.balloonActualBytes ?? this.ramBytes;
    this.balloonTarget = this.balloonFrom;
  }

  get connected(): boolean {
    return this.up_;
  }

  get facts(): VmFacts | undefined {
    return this.factsValue;
  }

  /** Whether start() was called and close() was not. */
  get running(): boolean {
    return this.started && !this.closed;
  }

  /** The balloon's actual size now. */
  get actualBytes(): number {
    const elapsedS = (performance.now() - this.balloonSince) / 1000;
    const d = this.balloonTarget - this.balloonFrom;
    const step = Math.min(Math.abs(d), this.balloonRateBytesPerSec * elapsedS);
    return Math.round(this.balloonFrom + Math.sign(d) * step);
  }

  /** The last balloon target set (the guest's target, not where it is). */
  get balloonTargetBytes(): number {
    return this.balloonTarget;
  }

  /** Moves the balloon's actual size at once (e.g. a guest that deflated itself). */
  setActual(bytes: number): void {
    this.balloonFrom = bytes;
    this.balloonTarget = bytes;
    this.balloonSince = performance.now();
  }

  /** Calls of one method, in order. */
  callsOf(method: string): DriverCall[] {
    return this.calls.filter((c) => c.method === method);
  }

  /** Arguments of every `setBalloon` call. */
  get balloonCalls(): number[] {
    return this.callsOf("setBalloon").map((c) => c.args[0] as number);
  }

  onEvent(listener: (e: DriverEvent) => void): void {
    this.listener = listener;
  }

  start(): void {
    this.record("start", []);
    this.started = true;
    if (this.upOnStart) setTimeout(() => this.up(), 0);
  }

  async close(): Promise<void> {
    this.record("close", []);
    this.closed = true;
    this.up_ = false;
  }

  /** The connection (re)established: reports `up` with fresh facts. */
  up(): void {
    if (this.closed) return;
    this.up_ = true;
    this.factsValue = { ramBytes: this.ramBytes, runState: this.runStateValue, balloonActualBytes: this.actualBytes };
    this.emit({ type: "up", facts: this.factsValue });
  }

  /** The connection dropped: reports `down`. */
  down(error = "fake hypervisor went away"): void {
    if (!this.up_) return;
    this.up_ = false;
    if (!this.keepFactsWhenDown) this.factsValue = undefined;
    this.emit({ type: "down", error });
  }

  /** Reports an event as the hypervisor would. `stop`/`resume` also change the run state. */
  emit(e: DriverEvent): void {
    if (e.type === "stop") this.setRunState("paused");
    if (e.type === "resume") this.setRunState("running");
    this.listener(e);
  }

  /** Changes the run state (and the facts, as a QMP STOP/RESUME would). */
  setRunState(state: string): void {
    this.runStateValue = state;
    if (this.factsValue) this.factsValue = { ...this.factsValue, runState: state };
  }

  async setBalloon(targetBytes: number): Promise<void> {
    this.command("setBalloon", [targetBytes]);
    const now = this.actualBytes;
    this.balloonFrom = now;
    this.balloonTarget = targetBytes;
    this.balloonSince = performance.now();
  }

  async queryBalloon(): Promise<number> {
    this.command("queryBalloon", []);
    return this.actualBytes;
  }

  async guestMemoryStats(): Promise<GuestMemoryStats | undefined> {
    this.command("guestMemoryStats", []);
    return this.guestStats;
  }

  async runState(): Promise<string> {
    this.command("runState", []);
    return this.runStateValue;
  }

  async configureMigration(settings: MigrationSettings): Promise<void> {
    this.command("configureMigration", [settings]);
  }

  async startMigration(uri: string): Promise<void> {
    this.command("startMigration", [uri]);
  }

  async startPostcopy(): Promise<void> {
    this.command("startPostcopy", []);
  }

  async cancelMigration(): Promise<void> {
    this.command("cancelMigration", []);
    this.onCancel(this);
  }

  async queryMigration(): Promise<MigrateStats> {
    this.command("queryMigration", []);
    return typeof this.migration === "function" ? this.migration() : this.migration;
  }

  async resumeMigration(uri: string): Promise<void> {
    this.command("resumeMigration", [uri]);
  }

  async recoverIncoming(host: string): Promise<string> {
    this.command("recoverIncoming", [host]);
    return this.incomingUri;
  }

  async prepareIncoming(settings: MigrationSettings, host: string): Promise<string> {
    this.command("prepareIncoming", [settings, host]);
    return this.incomingUri;
  }

  private record(method: string, args: unknown[]): void {
    this.calls.push({ method, args, atMs: performance.now(), actualBytes: this.actualBytes });
  }

  /** Records the call, then fails like a real driver while down or when scripted to. */
  private command(method: string, args: unknown[]): void {
    this.record(method, args);
    if (!this.up_) throw new UnavailableError(`fake driver: ${method} while down`);
    const f = this.failures.get(method);
    if (f) throw f;
  }
}
