/**
 * The two-host lab: host "a" and host "b", each a coordinator process plus a
 * QEMU slot, on one machine. One guest lives on whichever host is active; a
 * migration starts an incoming QEMU on the other host and moves the guest
 * there. Because the guest can go back and forth, a test can migrate the
 * same guest state twice (plain, then Ballast) and compare like for like.
 *
 * The agent's channel is a virtio-serial port (lab/vm.ts): each host's QEMU
 * serves the port's host end as a unix socket, and that host's coordinator
 * connects to it (`vms[].agentSocket`), so after switchover the agent
 * re-attaches to the destination's coordinator, as between real hypervisors.
 * `agentChannel: "tcp"` gives the older path instead: slirp guestfwd from the
 * guest's 10.0.2.100:50051 to the coordinator's agent port on 127.0.0.1.
 */
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { MigrationService, type MigrateRequestSchema, type Migration } from "../gen/ballast/v1/migration_pb.js";
import { VmService, type Vm } from "../gen/ballast/v1/vm_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { FailedPreconditionError } from "../shared/errors.js";
import { createClient, type Client } from "../shared/grpc-adapter.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { freePorts } from "../shared/net.js";
import { startCoordinatorProcess, waitForVm, type CoordinatorProcess } from "./coordinator-process.js";
import { ensureGuestImage, type GuestImage } from "./guest-image.js";
import { UnixProxy } from "./proxies.js";
import { GuestShell } from "./serial-shell.js";
import { startVm, vmPaths, type VmHandle } from "./vm.js";

/** A lab host name. */
export type HostName = "a" | "b";

/** Options for {@link Lab.start}. */
export interface LabOptions {
  /** Work directory for sockets and logs. Default: a fresh folder in /tmp (short, for unix socket paths). */
  workDir?: string;
  /** Guest RAM. Default 1024 MiB. */
  memMiB?: number;
  /** Balloon free-page-reporting on both hosts. Default false. */
  freePageReporting?: boolean;
  /** Attach the 500 MiB data disk as /dev/vdb. Default true. */
  dataDisk?: boolean;
  /** Run the guest agent. Default true. */
  agent?: boolean;
  /** Coordinators tell agents to self-balloon outside migrations. Default false (so a plain run is plain). */
  steadyState?: boolean;
  /** Agent sample interval pushed by the coordinators. Default 1000 ms. */
  sampleIntervalMs?: number;
  /** Balloon floor for the VM. Default "256MiB". */
  floor?: string;
  /** A prebuilt image; default: ensureGuestImage with dist/ballast-agent.mjs. */
  image?: GuestImage;
  /**
   * Each coordinator keeps its records in `<workDir>/state-<host>` (its
   * `stateDir`), so a restarted coordinator finds them. Default true.
   */
  stateDir?: boolean;
  /**
   * Put a {@link UnixProxy} between each coordinator and its QEMU's QMP
   * socket (the coordinator's `qmpSocket` is `<workDir>/<host>.qmpx`), so a
   * test can cut or delay QMP, or rewrite the `migrate` URI; see
   * {@link Lab.qmpProxies}. Default false.
   */
  qmpProxy?: boolean;
  /**
   * The agent's channel: "virtio-serial" (default: the port, no network
   * device in the guest) or "tcp" (guestfwd to each coordinator's agentPort).
   */
  agentChannel?: "virtio-serial" | "tcp";
  /** Progress lines for people ("booting guest on host a"). */
  onProgress?: (step: string) => void;
  logger?: Logger;
}

/** One lab host. */
export interface LabHost {
  name: HostName;
  coordinator: CoordinatorProcess;
  agentPort: number;
  migrations: Client<typeof MigrationService>;
  vms: Client<typeof VmService>;
  /** The QEMU on this host, if one runs. */
  vm?: VmHandle;
  /** The coordinator's stateDir, if the lab gave it one. */
  stateDir?: string;
}

const VM_NAME = "vm1";
const FINAL: ReadonlySet<Phase> = new Set([Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED]);
const ROOT = resolve(import.meta.dirname, "..");

/** A running two-host lab with one guest. */
export class Lab {
  /** The host the guest runs on now. */
  active: HostName = "a";
  /** The root shell on the guest's serial console (reconnected after each migration). */
  shell!: GuestShell;
  private readonly log: Logger;

  private constructor(
    readonly hosts: Record<HostName, LabHost>,
    readonly image: GuestImage,
    readonly workDir: string,
    private readonly options: LabOptions,
    private readonly ownsWorkDir: boolean,
  ) {
    this.log = (options.logger ?? silentLogger()).child({ component: "lab" });
  }

  /** Builds or reuses the guest image, starts both coordinators and boots the guest on host a. */
  static async start(options: LabOptions = {}): Promise<Lab> {
    const progress = options.onProgress ?? (() => {});
    const image =
      options.image ?? (await ensureGuestImage({ agentBundle: join(ROOT, "dist/ballast-agent.mjs"), onProgress: progress, logger: options.logger }));
    const ownsWorkDir = options.workDir === undefined;
    const workDir = options.workDir ?? mkdtempSync(join(tmpdir(), "blab-"));
    // Fixed listen ports (not :0), so a restarted coordinator serves where its peers and clients expect it.
    const [portA, portB, listenA, listenB] = (await freePorts(4)) as [number, number, number, number];
    progress("starting coordinators on host a and host b");
    const started: CoordinatorProcess[] = [];
    const proxies: Partial<Record<HostName, UnixProxy>> = {};
    let firstVm: VmHandle | undefined;
    let firstShell: GuestShell | undefined;
    try {
      const host = async (name: HostName, agentPort: number, listenPort: number): Promise<LabHost> => {
        const qmpPath = vmPaths(workDir, name).qmpPath;
        let qmpSocket = qmpPath;
        if (options.qmpProxy) {
          const proxy = await UnixProxy.start(join(resolve(workDir), `${name}.qmpx`), qmpPath);
          proxies[name] = proxy;
          qmpSocket = proxy.path;
        }
        const stateDir = options.stateDir === false ? undefined : join(resolve(workDir), `state-${name}`);
        if (stateDir) mkdirSync(stateDir, { recursive: true });
        const coordinator = await startCoordinatorProcess(workDir, `coordinator-${name}`, {
          hostId: `host-${name}`,
          listen: `127.0.0.1:${listenPort}`,
          ...(stateDir ? { stateDir } : {}),
          defaults: { steadyState: options.steadyState ?? false, sampleIntervalMs: options.sampleIntervalMs ?? 1000 },
          vms: [
            {
              name: VM_NAME,
              qmpSocket,
              agentId: VM_NAME,
              floor: options.floor ?? "256MiB",
              ...(options.agentChannel === "tcp" ? { agentPort } : { agentSocket: vmPaths(workDir, name).agentSocket }),
            },
          ],
        });
        started.push(coordinator);
        return {
          name,
          coordinator,
          agentPort,
          stateDir,
          migrations: createClient(MigrationService, coordinator.address),
          vms: createClient(VmService, coordinator.address),
        };
      };
      const hosts = { a: await host("a", portA, listenA), b: await host("b", portB, listenB) };
      const lab = new Lab(hosts, image, workDir, options, ownsWorkDir);
      lab.qmpProxies = proxies;
      progress("booting the guest on host a");
      hosts.a.vm = firstVm = await lab.startQemu("a", false);
      lab.shell = firstShell = await GuestShell.connect(hosts.a.vm.serialPath, { logger: options.logger });
      lab.shellOn = hosts.a.vm;
      await lab.shell.ready(120_000);
      if (options.agent !== false) {
        progress("waiting for the guest agent to attach");
        await lab.waitVm("a", (vm) => vm.agentConnected, "agent attached on host a", 60_000);
      }
      return lab;
    } catch (err) {
      // A failed start must not leave the guest's QEMU running (it would outlive the test run).
      firstShell?.close();
      await firstVm?.stop();
      await Promise.all(started.map((c) => c.stop()));
      await Promise.all(Object.values(proxies).map((p) => p.close()));
      if (ownsWorkDir) rmSync(workDir, { recursive: true, force: true });
      throw err;
    }
  }

  /** The host the guest is not on. */
  get other(): HostName {
    return this.active === "a" ? "b" : "a";
  }

  /** The QMP proxies by host, with {@link LabOptions.qmpProxy}. */
  qmpProxies: Partial<Record<HostName, UnixProxy>> = {};

  /**
   * Starts a QEMU on `name` (on the same sockets as before) and records it as
   * that host's VM. Any QEMU still recorded there must have exited. For fault
   * tests: e.g. a fresh plain running guest after the old one was killed.
   */
  async startQemuOn(name: HostName, incoming: boolean): Promise<VmHandle> {
    const vm = await this.startQemu(name, incoming);
    void vm.exited.then(() => this.exited.add(vm));
    this.hosts[name].vm = vm;
    return vm;
  }

  /** Whether a QEMU handle's process has exited. */
  hasExited(vm: VmHandle): boolean {
    return this.exited.has(vm);
  }

  /**
   * Attaches the shell to `name`'s QEMU (after a migration the lab did not
   * drive, or a fresh QEMU) and makes it the active host. Does not stop
   * anything. Waits for the shell to answer.
   */
  async useHost(name: HostName, readyTimeoutMs = 60_000): Promise<void> {
    const vm = this.hosts[name].vm;
    if (!vm) throw new FailedPreconditionError(`lab: no QEMU on host ${name}`);
    this.active = name;
    await this.moveShellTo(vm);
    await this.shell.ready(readyTimeoutMs);
  }

  /** Moves the shell to `name`'s QEMU without changing the active host (e.g. to the destination during post-copy). */
  async attachShell(name: HostName): Promise<GuestShell> {
    const vm = this.hosts[name].vm;
    if (!vm) throw new FailedPreconditionError(`lab: no QEMU on host ${name}`);
    await this.moveShellTo(vm);
    return this.shell;
  }

  /**
   * Kills `name`'s coordinator with SIGKILL and starts it again with the same
   * config (same ports, same stateDir). `betweenMs` is how long it stays down.
   */
  async crashCoordinator(name: HostName, opts: { betweenMs?: number; restart?: boolean } = {}): Promise<void> {
    const co = this.hosts[name].coordinator;
    await co.kill9();
    this.log.info({ host: name }, "coordinator killed with SIGKILL");
    if (opts.restart === false) return;
    if (opts.betweenMs) await new Promise((r) => setTimeout(r, opts.betweenMs));
    await co.restart();
    this.log.info({ host: name, pid: co.pid }, "coordinator restarted");
  }

  private startQemu(name: HostName, incoming: boolean): Promise<VmHandle> {
    return startVm({
      name,
      workDir: this.workDir,
      image: this.image,
      memMiB: this.options.memMiB ?? 1024,
      ...(this.options.agentChannel === "tcp" ? { guestfwdPort: this.hosts[name].agentPort, agentChannel: "tcp" as const } : {}),
      incoming,
      freePageReporting: this.options.freePageReporting ?? false,
      dataDisk: this.options.dataDisk ?? true,
      vmId: VM_NAME,
      agent: this.options.agent ?? true,
      logger: this.options.logger,
    });
  }

  /** Polls a host's GetVm until `pred` holds. */
  async waitVm(host: HostName, pred: (vm: Vm) => boolean, what: string, timeoutMs = 30_000): Promise<Vm> {
    return waitForVm(this.hosts[host].vms, VM_NAME, pred, `${what} (lab)`, timeoutMs);
  }

  /** The VM as the active host's coordinator sees it. */
  async vm(host: HostName = this.active): Promise<Vm> {
    const { vm } = await this.hosts[host].vms.getVm({ name: VM_NAME });
    if (!vm) throw new FailedPreconditionError("lab: coordinator returned no VM");
    return vm;
  }

  /**
   * Migrates the guest to the other host and returns the final record.
   * On success the old QEMU is stopped, the shell follows the guest, and
   * (with an agent) this waits until the agent has re-attached.
   *
   * `onPostcopy` runs once when the migration reaches POSTCOPY_ACTIVE, with
   * the shell already moved to the destination (the guest runs there now).
   */
  async migrate(
    request: Omit<MessageInitShape<typeof MigrateRequestSchema>, "vm" | "destination" | "$typeName">,
    hooks: { onUpdate?: (m: Migration) => void; onPostcopy?: (shell: GuestShell) => Promise<void> } = {},
  ): Promise<Migration> {
    const from = this.hosts[this.active];
    const to = this.hosts[this.other];
    const incoming = await this.startIncoming();
    let last: Migration | undefined;
    let hook: Promise<void> | undefined;
    for await (const msg of from.migrations.migrate({ ...request, vm: VM_NAME, destination: to.coordinator.address })) {
      if (!msg.migration) continue;
      last = msg.migration;
      hooks.onUpdate?.(last);
      if (last.phase === Phase.POSTCOPY_ACTIVE && hooks.onPostcopy && !hook) {
        const run = hooks.onPostcopy;
        // The guest runs on the destination now: the shell goes there early.
        hook = this.moveShellTo(incoming).then(() => run(this.shell));
      }
    }
    if (hook) await hook;
    if (!last) throw new FailedPreconditionError("lab: migrate stream ended without a record");
    if (!FINAL.has(last.phase)) {
      // Seen now and then: the stream ended cleanly before its final message. The record is the truth.
      this.log.warn({ phase: Phase[last.phase] }, "migrate stream ended before the final phase; reading the record");
      const id = last.id;
      const until = Date.now() + 120_000;
      for (;;) {
        const m = (await from.migrations.getMigration({ id })).migration;
        if (m && FINAL.has(m.phase)) {
          last = m;
          break;
        }
        if (Date.now() > until) throw new FailedPreconditionError(`lab: migration ${id} did not reach a final phase`);
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    if (last.phase !== Phase.COMPLETED) {
      this.log.warn({ phase: Phase[last.phase], error: last.error }, "migration did not complete; guest stays on the source");
      await incoming.stop();
      to.vm = undefined;
      return last;
    }
    await this.followGuest();
    return last;
  }

  private async moveShellTo(vm: VmHandle): Promise<void> {
    if (this.shellOn === vm) return;
    this.shell.close();
    this.shell = await GuestShell.connect(vm.serialPath, { logger: this.options.logger });
    this.shellOn = vm;
  }

  /** QEMU processes of this lab that have exited (their logs stay readable until stop). */
  private readonly exited = new WeakSet<VmHandle>();
  /** The QEMU whose serial console `shell` is attached to. */
  private shellOn: VmHandle | undefined;

  /**
   * Starts a QEMU with `-incoming defer` on the host the guest is not on (if
   * none runs there) and waits until that host's coordinator sees it.
   */
  async startIncoming(): Promise<VmHandle> {
    const to = this.hosts[this.other];
    if (!to.vm || this.exited.has(to.vm)) {
      // A failed or cancelled incoming migration ends that QEMU: start a fresh one.
      const vm = await this.startQemu(to.name, true);
      void vm.exited.then(() => this.exited.add(vm));
      to.vm = vm;
    }
    await this.waitVm(to.name, (vm) => vm.qmpConnected && vm.runState === "inmigrate", `incoming QEMU on host ${to.name}`);
    return to.vm;
  }

  /** Whether the other host has a live incoming QEMU. */
  async incomingReady(): Promise<boolean> {
    const vm = this.hosts[this.other].vm;
    return vm !== undefined && !this.exited.has(vm);
  }

  /**
   * After a completed migration (by this lab or by anyone calling the
   * coordinators): stops the old source QEMU by PID, makes the other host
   * active, moves the shell, and waits for the agent to re-attach there.
   */
  async followGuest(): Promise<void> {
    const from = this.hosts[this.active];
    const to = this.hosts[this.other];
    if (!to.vm) throw new FailedPreconditionError(`lab: no QEMU on host ${to.name} to follow the guest to`);
    await from.vm?.stop();
    from.vm = undefined;
    this.active = to.name;
    await this.moveShellTo(to.vm);
    await this.shell.ready(60_000);
    if (this.options.agent !== false) await this.waitVm(to.name, (vm) => vm.agentConnected, `agent re-attached on host ${to.name}`, 60_000);
  }

  /** Stops every process the lab started, by PID, and removes its work dir if it made it. */
  async stop(): Promise<void> {
    this.shell?.close();
    for (const h of Object.values(this.hosts)) {
      h.migrations.close();
      h.vms.close();
    }
    await Promise.all(Object.values(this.hosts).map(async (h) => h.vm?.stop()));
    await Promise.all(Object.values(this.hosts).map((h) => h.coordinator.stop()));
    await Promise.all(Object.values(this.qmpProxies).map((p) => p?.close()));
    if (this.ownsWorkDir) rmSync(this.workDir, { recursive: true, force: true });
  }
}

export { MigrationMode, Phase };
