/**
 * The hypervisor driver boundary: everything the coordinator asks of the
 * thing that runs a VM. QMP is today's driver (coordinator/qmp-driver.ts);
 * a libvirt driver implements the same interface through libvirt's API.
 *
 * The driver owns its connection (connect, reconnect, inspect) and reports
 * what it learns as typed {@link DriverEvent}s to exactly one listener, the
 * VM's supervisor. Commands fail fast with an UnavailableError while the
 * connection is down; nothing is queued across a reconnect, because a
 * command queued across a QEMU restart could act on a different VM.
 */
import type { MigrateStats } from "./qemu.js";

/** What the driver learns about a VM each time it (re)connects. */
export interface VmFacts {
  /** RAM size in bytes (the `-m` size). */
  ramBytes: number;
  /** Run state: "running", "paused", "inmigrate", "postmigrate", ... */
  runState: string;
  /** The balloon's current size as the guest reports it (guest memory in bytes). */
  balloonActualBytes: number;
}

/** The guest's own memory numbers from the virtio-balloon stats queue (untrusted hints). */
export interface GuestMemoryStats {
  /** `stat-available-memory`, bytes; undefined when the guest does not report it. */
  availableBytes: number | undefined;
  /** `stat-free-memory`, bytes. */
  freeBytes: number | undefined;
  /** `stat-disk-caches`, bytes. */
  diskCachesBytes: number | undefined;
  /** When the guest last updated the stats, Unix seconds (0: never). */
  lastUpdateS: number;
}

/** Settings applied before a migration, on the source (all) or the destination (capabilities). */
export interface MigrationSettings {
  /** Enables post-copy (`postcopy-ram`, `postcopy-blocktime`). */
  postcopy: boolean;
  /** Link cap for pre-copy and post-copy, bytes per second. Source only. */
  maxBandwidthBytesPerSec?: number;
  /** `downtime-limit`, ms. Source only. */
  downtimeLimitMs?: number;
}

/** What a driver reports to its VM's supervisor. */
export type DriverEvent =
  | { type: "up"; facts: VmFacts }
  | { type: "down"; error: string }
  | { type: "migration-status"; status: string }
  | { type: "migration-pass"; pass: number }
  | { type: "stop" }
  | { type: "resume" }
  | { type: "balloon-change"; actualBytes: number }
  /** The guest opened or closed its end of the agent's virtio-serial port (QMP `VSERPORT_CHANGE`; rate-limited, a hint). */
  | { type: "agent-port"; open: boolean };

/** One VM's hypervisor connection. */
export interface HypervisorDriver {
  /** "qmp" or "libvirt", for logs and the API. */
  readonly kind: string;
  /** True between an `up` and the next `down`. */
  readonly connected: boolean;
  /** The last facts reported with `up`; undefined while down. */
  readonly facts: VmFacts | undefined;
  /**
   * Whether an incoming migration needs this VM already started to receive
   * (QEMU `-incoming defer`, checked as run state "inmigrate"). False for
   * libvirt, which creates the incoming domain itself. Absent means true.
   */
  readonly incomingNeedsQemu?: boolean;
  /** Sets the one listener. */
  onEvent(listener: (e: DriverEvent) => void): void;
  /** Starts connecting in the background; reconnects after a drop until closed. */
  start(): void;
  /** Stops reconnecting and closes the connection. */
  close(): Promise<void>;

  /** Asks the guest to hold `targetBytes` of memory (QMP `balloon` semantics). */
  setBalloon(targetBytes: number): Promise<void>;
  /** The guest's memory as the balloon driver reports it. */
  queryBalloon(): Promise<number>;
  /** Balloon stats from the guest, or undefined when it reports none. */
  guestMemoryStats(): Promise<GuestMemoryStats | undefined>;
  /** Re-reads the run state. */
  runState(): Promise<string>;

  /** Capabilities and parameters for the next migration. */
  configureMigration(settings: MigrationSettings): Promise<void>;
  /** Starts an outgoing migration to what the destination's `prepareIncoming` returned. */
  startMigration(uri: string): Promise<void>;
  /** Switches a running migration to post-copy. */
  startPostcopy(): Promise<void>;
  /** Cancels a migration that is not in post-copy yet. */
  cancelMigration(): Promise<void>;
  /** The current (or last) migration's numbers. */
  queryMigration(): Promise<MigrateStats>;
  /** Source: resumes a post-copy migration paused by a broken stream, to the URI from the destination's `recoverIncoming`. */
  resumeMigration(uri: string): Promise<void>;
  /** Destination: listens again for a paused post-copy migration; returns the URI to resume to. */
  recoverIncoming(host: string): Promise<string>;
  /** Destination: gets a VM started to receive ready, returns the URI the source should send to. */
  prepareIncoming(settings: MigrationSettings, host: string): Promise<string>;
  /**
   * The host end (a unix socket) of the VM's agent virtio-serial port
   * (coordinator/agent-channel.ts), or undefined when the VM has none. Asked
   * before every connect: libvirt moves it with every start and migration.
   */
  agentChannelPath?(): Promise<string | undefined>;
}

/** QEMU MigrationStatus values after which a migration is over. */
export const FINAL_STATUSES: ReadonlySet<string> = new Set(["completed", "failed", "cancelled"]);
