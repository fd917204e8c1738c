/**
 * The coordinator's live view of one VM: its QMP connection, balloon
 * controller, agent session and the migration touching it. One per VmConfig.
 */
import { EventEmitter } from "node:events";
import type { MemorySample, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { UnavailableError, errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { BalloonController } from "./balloon-controller.js";
import type { VmConfig } from "./config.js";
import { Qemu } from "./qemu.js";
import { QmpClient, type QmpEvent } from "./qmp-client.js";

/** Options for {@link VmRuntime}. */
export interface VmRuntimeOptions {
  config: VmConfig;
  logger: Logger;
  /** Delay between connection attempts while QEMU is not up yet. Default 500 ms. */
  retryMs?: number;
}

/** Who is migrating this VM on this host, and in which direction. */
export interface VmMigrationRef {
  id: string;
  direction: "outgoing" | "incoming";
  /** The phase last announced to the agent; updated by the owner. */
  phase: Phase;
  mode: MigrationMode;
  pass: number;
  /** PREPARE deadline (Unix ms), 0 when none. */
  deadlineUnixMs: number;
}

/**
 * Live state of one VM. Emits `qmp-event` (QmpEvent), `ready` and `balloon`
 * ({targetBytes, actualBytes}).
 */
export class VmRuntime extends EventEmitter {
  readonly config: VmConfig;
  readonly qmp: QmpClient;
  readonly qemu: Qemu;
  /** Set once QMP answered and the RAM size is known. */
  balloon: BalloonController | undefined;
  ramBytes = 0;
  runState = "unknown";
  lastSample: MemorySample | undefined;
  lastSampleAtMs = 0;
  migration: VmMigrationRef | undefined;
  private readonly log: Logger;
  private readonly retryMs: number;
  private stopped = false;
  private connecting: Promise<void> | undefined;
  private retryTimer: NodeJS.Timeout | undefined;
  private failedConnects = 0;

  constructor(options: VmRuntimeOptions) {
    super();
    this.config = options.config;
    this.log = options.logger.child({ vm: options.config.name });
    this.retryMs = options.retryMs ?? 500;
    this.qmp = new QmpClient({ socketPath: this.config.qmpSocket, logger: this.log });
    this.qemu = new Qemu(this.qmp);
    this.qmp.on("event", (ev: QmpEvent) => this.onQmpEvent(ev));
    this.qmp.on("connected", () => void this.afterConnect());
  }

  /** Starts connecting in the background; QEMU may come up later. */
  start(): void {
    void this.connectLoop();
  }

  /** Whether QMP is usable right now. */
  get qmpConnected(): boolean {
    return this.qmp.connected && this.balloon !== undefined;
  }

  /** Throws UnavailableError unless QMP is connected and the balloon controller exists. */
  async ready(timeoutMs = 5000): Promise<BalloonController> {
    const until = Date.now() + timeoutMs;
    while (!this.qmpConnected) {
      if (this.stopped || Date.now() > until) {
        throw new UnavailableError(`VM ${this.config.name}: no QMP connection to ${this.config.qmpSocket}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    return this.balloon as BalloonController;
  }

  /** Re-reads the run state from QEMU. */
  async refreshRunState(): Promise<string> {
    const s = await this.qemu.queryStatus();
    this.runState = s.status;
    return s.status;
  }

  /** Closes QMP and stops retrying. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.balloon?.dispose();
    await this.qmp.close();
  }

  private async connectLoop(): Promise<void> {
    if (this.stopped || this.connecting) return;
    this.connecting = (async () => {
      try {
        await this.qmp.connect();
      } catch (err) {
        this.log.debug({ err: errorMessage(err) }, "QMP not reachable yet");
        this.connecting = undefined;
        // Back off to 5 s: a host may list many VMs whose QEMU is not up yet.
        this.failedConnects++;
        const delay = Math.min(5000, this.retryMs * 2 ** Math.min(this.failedConnects - 1, 4));
        if (!this.stopped) this.retryTimer = setTimeout(() => void this.connectLoop(), delay);
        return;
      }
      this.connecting = undefined;
      this.failedConnects = 0;
    })();
    await this.connecting;
  }

  private async afterConnect(): Promise<void> {
    try {
      this.ramBytes = await this.qemu.ramSizeBytes();
      await this.refreshRunState();
      const maxBytes = this.config.maxBytes === 0 ? this.ramBytes : Math.min(this.config.maxBytes, this.ramBytes);
      // A reconnect may reach a different QEMU process (e.g. a new incoming
      // instance on the same socket path), so balloon state starts afresh.
      this.balloon?.dispose();
      this.balloon = new BalloonController(this.qemu, { floorBytes: Math.min(this.config.floorBytes, maxBytes), maxBytes, logger: this.log });
      this.balloon.on("state", (s: { targetBytes: number | undefined; actualBytes: number | undefined }) => this.emit("balloon", s));
      try {
        await this.balloon.refresh();
      } catch (err) {
        this.log.warn({ err: errorMessage(err) }, "query-balloon failed");
      }
      this.log.info({ ramBytes: this.ramBytes, runState: this.runState }, "QMP connected");
      this.emit("ready");
    } catch (err) {
      this.log.error({ err: errorMessage(err) }, "QMP connected but the VM could not be inspected");
    }
  }

  private onQmpEvent(ev: QmpEvent): void {
    if (ev.event === "STOP") this.runState = "paused";
    if (ev.event === "RESUME") this.runState = "running";
    this.emit("qmp-event", ev);
  }
}
