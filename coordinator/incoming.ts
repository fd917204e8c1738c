/**
 * The destination side of a migration. A peer coordinator asks us to get our
 * QEMU (started with `-incoming defer`) ready; we set the capabilities, start
 * `migrate-incoming` on a fresh loopback port, then follow our QEMU's events
 * and tell the VM's agent, which re-attaches here after switchover.
 */
import { MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { FailedPreconditionError, NotFoundError, errorMessage } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { freePort } from "../shared/net.js";
import type { AgentHub } from "./agent-hub.js";
import type { MigrateStats } from "./qemu.js";
import type { QmpEvent } from "./qmp-client.js";
import type { VmRuntime } from "./vm-runtime.js";

/** Options for {@link IncomingManager}. */
export interface IncomingOptions {
  vms: ReadonlyMap<string, VmRuntime>;
  hub: AgentHub;
  /** Address our QEMU listens on for the migration stream. */
  incomingHost: string;
  logger: Logger;
}

/** What the destination knows about one incoming migration. */
export interface IncomingRecord {
  id: string;
  vm: string;
  mode: MigrationMode;
  uri: string;
  phase: Phase;
  stats?: MigrateStats;
  startedMs: number;
}

/** Handles PeerService on the destination. */
export class IncomingManager {
  private readonly records = new Map<string, IncomingRecord>();
  private readonly log: Logger;

  constructor(private readonly options: IncomingOptions) {
    this.log = options.logger.child({ component: "incoming" });
  }

  /** Gets the named VM's QEMU ready to receive and returns the URI to send to. */
  async prepare(vmName: string, migrationId: string, mode: MigrationMode): Promise<string> {
    const vm = this.options.vms.get(vmName);
    if (!vm) throw new NotFoundError(`no VM named ${JSON.stringify(vmName)} on this host`);
    if (this.records.has(migrationId)) throw new FailedPreconditionError(`migration ${migrationId} is already incoming here`);
    await vm.ready();
    const state = await vm.refreshRunState();
    if (state !== "inmigrate") {
      throw new FailedPreconditionError(`VM ${vmName} here is ${state}; the destination QEMU must be started with -incoming defer`);
    }
    const postcopy = mode === MigrationMode.POSTCOPY || mode === MigrationMode.HYBRID;
    await vm.qemu.setMigrationCapabilities({ events: true, "postcopy-ram": postcopy, "postcopy-blocktime": postcopy });
    const port = await freePort(this.options.incomingHost);
    const uri = `tcp:${this.options.incomingHost}:${port}`;
    await vm.qemu.migrateIncoming(uri);
    const rec: IncomingRecord = { id: migrationId, vm: vmName, mode, uri, phase: Phase.PRECOPY_PASS, startedMs: Date.now() };
    this.records.set(migrationId, rec);
    vm.migration = { id: migrationId, direction: "incoming", phase: Phase.PRECOPY_PASS, mode, pass: 0, deadlineUnixMs: 0 };
    this.follow(vm, rec);
    this.log.info({ vm: vmName, id: migrationId, uri }, "incoming migration ready");
    return uri;
  }

  /** The record of an incoming migration, or NotFoundError. */
  get(id: string): IncomingRecord {
    const r = this.records.get(id);
    if (!r) throw new NotFoundError(`no incoming migration ${JSON.stringify(id)}`);
    return r;
  }

  private follow(vm: VmRuntime, rec: IncomingRecord): void {
    const log = this.log.child({ vm: rec.vm, id: rec.id });
    const setPhase = (phase: Phase) => {
      if (rec.phase === phase) return;
      rec.phase = phase;
      if (vm.migration?.id === rec.id) vm.migration.phase = phase;
      log.info({ phase: Phase[phase] }, "incoming phase");
      void this.options.hub.sendPhase(rec.vm, { migrationId: rec.id, phase, mode: rec.mode });
    };
    const onEvent = (ev: QmpEvent) => {
      if (ev.event !== "MIGRATION") return;
      const status = String(ev.data.status ?? "");
      if (status === "postcopy-active") setPhase(Phase.POSTCOPY_ACTIVE);
      else if (status === "completed" || status === "failed" || status === "cancelled") {
        vm.off("qmp-event", onEvent);
        void this.finish(vm, rec, status, setPhase, log);
      }
    };
    vm.on("qmp-event", onEvent);
  }

  private async finish(vm: VmRuntime, rec: IncomingRecord, status: string, setPhase: (p: Phase) => void, log: Logger): Promise<void> {
    try {
      rec.stats = await vm.qemu.queryMigrate();
      await vm.refreshRunState();
    } catch (err) {
      log.warn({ err: errorMessage(err) }, "could not read final incoming stats");
    }
    setPhase(status === "completed" ? Phase.COMPLETED : Phase.FAILED);
    if (status === "completed") await this.deflateAfterArrival(vm, log);
  }

  /**
   * The guest arrives with the balloon its source inflated. Its agent is
   * supposed to restore, but an agent starved of memory right after
   * switchover cannot (seen in the bench: MemAvailable 4 MiB, agent silent),
   * so the host gives the memory back itself; an agent with steady-state
   * ballooning shrinks again from there at its own pace.
   */
  private async deflateAfterArrival(vm: VmRuntime, log: Logger): Promise<void> {
    const ctl = vm.balloon;
    if (!ctl) return;
    try {
      const applied = await ctl.setTarget(ctl.clamp(Number.MAX_SAFE_INTEGER), { force: true, reason: "deflate after an incoming migration" });
      log.info({ applied }, "balloon deflated after arrival");
    } catch (err) {
      log.warn({ err: errorMessage(err) }, "could not deflate after arrival");
    }
  }
}
