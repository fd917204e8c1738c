/**
 * The QMP hypervisor driver: one QEMU process reached through a QMP unix
 * socket reserved for the coordinator.
 *
 * One reconnect layer: the QMP client itself never reconnects; this driver
 * runs the loop with the shared backoff (shared/retry.ts). After each
 * handshake it inspects the VM (RAM size, run state, balloon, stats polling)
 * and reports `up` only once that worked. A slow or failed inspection is
 * retried while the socket stays up, so one slow answer right after
 * connecting never leaves the VM unusable until the socket drops.
 */
import { errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { BACKOFF, Backoff, sleep } from "../shared/retry.js";
import { freePort } from "../shared/net.js";
import type { DriverEvent, GuestMemoryStats, HypervisorDriver, MigrationSettings, VmFacts } from "./hypervisor.js";
import { Qemu, type MigrateStats } from "./qemu.js";
import { QmpClient, type QmpEvent } from "./qmp-client.js";

/** Options for {@link QmpDriver}. */
export interface QmpDriverOptions {
  socketPath: string;
  logger: Logger;
  /** Per-command timeout. Default 5000 ms. */
  commandTimeoutMs?: number;
  /** Budget for connect + greeting + capabilities. Default 3000 ms. */
  connectTimeoutMs?: number;
  /** Balloon stats polling interval set in QEMU after connecting, seconds. Default 2; 0 leaves it off. */
  statsPollingIntervalS?: number;
  /** Backoff of the reconnect loop. Default {@link BACKOFF.reconnect}. */
  backoff?: { initialMs: number; maxMs: number };
  /** The unix socket of the VM's agent virtio-serial chardev (`vms[].agentSocket`), if it has one. */
  agentSocket?: string;
}

/** {@link HypervisorDriver} over QMP. */
export class QmpDriver implements HypervisorDriver {
  readonly kind = "qmp";
  private readonly qmp: QmpClient;
  private readonly qemu: Qemu;
  private readonly log: Logger;
  private readonly backoff: Backoff;
  private readonly statsIntervalS: number;
  private listener: (e: DriverEvent) => void = () => {};
  private factsValue: VmFacts | undefined;
  private closed = false;
  private timer: NodeJS.Timeout | undefined;
  private session = 0;

  constructor(private readonly options: QmpDriverOptions) {
    this.log = options.logger.child({ driver: "qmp", socket: options.socketPath });
    this.qmp = new QmpClient({
      socketPath: options.socketPath,
      logger: options.logger,
      reconnect: false,
      commandTimeoutMs: options.commandTimeoutMs ?? 5000,
      connectTimeoutMs: options.connectTimeoutMs ?? 3000,
    });
    this.qemu = new Qemu(this.qmp);
    this.backoff = new Backoff(options.backoff ?? BACKOFF.reconnect);
    this.statsIntervalS = options.statsPollingIntervalS ?? 2;
    this.qmp.on("event", (ev) => this.onQmpEvent(ev));
    this.qmp.on("disconnected", (err) => this.onDisconnected(err));
  }

  get connected(): boolean {
    return this.factsValue !== undefined && this.qmp.connected;
  }

  get facts(): VmFacts | undefined {
    return this.factsValue;
  }

  onEvent(listener: (e: DriverEvent) => void): void {
    this.listener = listener;
  }

  start(): void {
    this.schedule(0);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.qmp.close();
  }

  setBalloon(targetBytes: number): Promise<void> {
    return this.qemu.balloon(targetBytes);
  }

  queryBalloon(): Promise<number> {
    return this.qemu.queryBalloon();
  }

  async guestMemoryStats(): Promise<GuestMemoryStats | undefined> {
    const raw = await this.qmp.execute<unknown>("qom-get", { path: BALLOON_PATH, property: "guest-stats" });
    return parseGuestStats(raw);
  }

  async runState(): Promise<string> {
    return (await this.qemu.queryStatus()).status;
  }

  async configureMigration(s: MigrationSettings): Promise<void> {
    await this.qemu.setMigrationCapabilities({ events: true, "postcopy-ram": s.postcopy, "postcopy-blocktime": s.postcopy });
    // QEMU's post-copy phase is unthrottled by default (max-postcopy-bandwidth 0): cap it too, so the link limit holds throughout.
    await this.qemu.setMigrationParameters({
      maxBandwidthBytesPerSec: s.maxBandwidthBytesPerSec,
      maxPostcopyBandwidthBytesPerSec: s.maxBandwidthBytesPerSec,
      downtimeLimitMs: s.downtimeLimitMs,
    });
  }

  startMigration(uri: string): Promise<void> {
    return this.qemu.migrate(uri);
  }

  startPostcopy(): Promise<void> {
    return this.qemu.startPostcopy();
  }

  cancelMigration(): Promise<void> {
    return this.qemu.migrateCancel();
  }

  queryMigration(): Promise<MigrateStats> {
    return this.qemu.queryMigrate();
  }

  async agentChannelPath(): Promise<string | undefined> {
    return this.options.agentSocket || undefined;
  }

  resumeMigration(uri: string): Promise<void> {
    return this.qemu.migrateResume(uri);
  }

  async recoverIncoming(host: string): Promise<string> {
    const uri = `tcp:${host}:${await freePort(host)}`;
    await this.qemu.migrateRecover(uri);
    return uri;
  }

  async prepareIncoming(s: MigrationSettings, host: string): Promise<string> {
    await this.configureMigration({ postcopy: s.postcopy });
    const uri = `tcp:${host}:${await freePort(host)}`;
    await this.qemu.migrateIncoming(uri);
    return uri;
  }

  // ---- connection -------------------------------------------------------

  private schedule(ms: number): void {
    if (this.closed) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.connectOnce();
    }, ms);
  }

  private async connectOnce(): Promise<void> {
    if (this.closed) return;
    try {
      await this.qmp.connect();
    } catch (err) {
      const delay = this.backoff.next();
      // Once per streak at warn, so a VM whose QEMU is not up does not flood the log.
      this.log[this.backoff.attempts === 1 ? "info" : "debug"]({ err: errorMessage(err), retryInMs: delay }, "QMP not reachable");
      this.schedule(delay);
      return;
    }
    const session = ++this.session;
    // Inspect until it works or the socket drops: a slow first answer must not leave the VM unusable.
    const inspectBackoff = new Backoff(BACKOFF.poll);
    while (!this.closed && this.qmp.connected && session === this.session) {
      try {
        const facts = await this.inspect();
        if (session !== this.session || !this.qmp.connected) return;
        this.factsValue = facts;
        this.backoff.reset();
        this.log.info({ ...facts, qemu: this.qmp.greeting?.version.qemu }, "QMP connected");
        this.emit({ type: "up", facts });
        return;
      } catch (err) {
        const delay = inspectBackoff.next();
        this.log.warn({ err: errorMessage(err), retryInMs: delay }, "QMP connected but the VM could not be inspected; retrying");
        await sleep(delay);
      }
    }
  }

  private async inspect(): Promise<VmFacts> {
    const ramBytes = await this.qemu.ramSizeBytes();
    const runState = (await this.qemu.queryStatus()).status;
    const balloonActualBytes = await this.qemu.queryBalloon();
    if (this.statsIntervalS > 0) {
      await this.qmp
        .execute("qom-set", { path: BALLOON_PATH, property: "guest-stats-polling-interval", value: this.statsIntervalS })
        .catch((err: unknown) => this.log.debug({ err: errorMessage(err) }, "balloon stats polling not enabled"));
    }
    return { ramBytes, runState, balloonActualBytes };
  }

  private onDisconnected(err: Error): void {
    this.session++;
    const wasUp = this.factsValue !== undefined;
    this.factsValue = undefined;
    if (wasUp) this.emit({ type: "down", error: err.message });
    if (!this.closed) this.schedule(this.backoff.next());
  }

  private onQmpEvent(ev: QmpEvent): void {
    const e = translateQmpEvent(ev);
    if (!e) return;
    if (this.factsValue && e.type === "stop") this.factsValue = { ...this.factsValue, runState: "paused" };
    if (this.factsValue && e.type === "resume") this.factsValue = { ...this.factsValue, runState: "running" };
    this.emit(e);
  }

  private emit(e: DriverEvent): void {
    try {
      this.listener(e);
    } catch (err) {
      this.log.error({ err: errorMessage(err), event: e.type }, "driver listener threw");
    }
  }
}

/** The balloon device's QOM path: the lab and the README give it `id=balloon0`. */
const BALLOON_PATH = "/machine/peripheral/balloon0";

/** The `id=` of the agent's `virtserialport` (README, lab/vm.ts): QEMU emits VSERPORT_CHANGE only for a port with an id. */
export const AGENT_PORT_ID = "agentport";

/** Maps a raw QMP event to a driver event; the one place MIGRATION events are parsed. */
export function translateQmpEvent(ev: QmpEvent): DriverEvent | undefined {
  switch (ev.event) {
    case "MIGRATION":
      return typeof ev.data.status === "string" ? { type: "migration-status", status: ev.data.status } : undefined;
    case "MIGRATION_PASS":
      // A pass is a uint32 on the wire (PhaseEvent.pass, Migration.pass): anything else cannot be sent on.
      return typeof ev.data.pass === "number" && Number.isInteger(ev.data.pass) && ev.data.pass >= 0 && ev.data.pass <= 0xffff_ffff
        ? { type: "migration-pass", pass: ev.data.pass }
        : undefined;
    case "STOP":
      return { type: "stop" };
    case "RESUME":
      return { type: "resume" };
    case "VSERPORT_CHANGE":
      // Only the agent's port: another one (qemu-guest-agent's) says nothing about ours.
      return ev.data.id === AGENT_PORT_ID && typeof ev.data.open === "boolean" ? { type: "agent-port", open: ev.data.open } : undefined;
    case "BALLOON_CHANGE":
      return typeof ev.data.actual === "number" && Number.isSafeInteger(ev.data.actual) && ev.data.actual >= 0
        ? { type: "balloon-change", actualBytes: ev.data.actual }
        : undefined;
    default:
      return undefined;
  }
}

/** Parses `qom-get guest-stats`; numbers the guest did not report (QEMU gives -1 or omits them) read as undefined. */
export function parseGuestStats(raw: unknown): GuestMemoryStats | undefined {
  if (typeof raw !== "object" || raw === null) return undefined;
  const r = raw as { stats?: Record<string, unknown>; "last-update"?: unknown };
  const stats = r.stats ?? {};
  const n = (k: string): number | undefined => {
    const v = stats[k];
    return typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : undefined;
  };
  const last = typeof r["last-update"] === "number" && Number.isFinite(r["last-update"]) ? r["last-update"] : 0;
  return { availableBytes: n("stat-available-memory"), freeBytes: n("stat-free-memory"), diskCachesBytes: n("stat-disk-caches"), lastUpdateS: last };
}
