/**
 * The libvirt lab: two real libvirt daemons on one machine, each a
 * "hypervisor host" with its own coordinator (libvirt driver), and one
 * libvirt-managed guest that migrates between them through libvirt.
 *
 * The recipe is the one measured on this machine (shared rig notes,
 * "Two libvirt hosts on one machine"):
 * - packages libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients
 *   (lab/preflight.ts); the `libvirt-qemu` user and the `kvm` and
 *   `libvirt-qemu` groups, which libvirtd looks up even when qemu.conf
 *   says root;
 * - per daemon a libvirtd.conf (unix socket without auth, its own
 *   `host_uuid`: libvirt refuses a migration between equal host UUIDs) and
 *   a qemu.conf (root, no security driver, `stdio_handler="file"` so no
 *   virtlogd, `cgroup_controllers=[ ]` so the two daemons' domain ids do not
 *   collide, its own migration port range) plus, beyond the recipe,
 *   `seccomp_sandbox = 0`: libvirt's default `-sandbox spawn=deny` makes
 *   QEMU crash when the guestfwd below forks its socat;
 * - each daemon runs inside `unshare --mount --uts --propagation private`
 *   with its own folders bind-mounted onto /etc/libvirt, /run/libvirt,
 *   /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, and its own
 *   host name. The recipe ran daemon A in the root namespace; here both get
 *   one, so everything lives under the lab's work dir and the host's own
 *   /etc/libvirt and /run/libvirt stay untouched. From outside, a daemon is
 *   `qemu+unix:///system?socket=<work>/<host>/run/libvirt-sock`.
 *
 * The guest: a transient TCG domain (`type='qemu'`, q35) booting the QEMU
 * lab's image (lab/guest-image.ts) with a virtio balloon (stats every 2 s,
 * deflate-on-oom) and the serial console on a unix socket. Paths inside
 * /var/lib/libvirt resolve per host (the bind mounts), so the same domain
 * XML finds each host's own serial socket and agent port after migration.
 *
 * The agent link: the guest's 10.0.2.100:50051 must reach *this host's*
 * coordinator, as with the QEMU lab's `guestfwd`. libvirt's native
 * `<interface type='user'>` can neither restrict the network nor forward
 * guest connections to the host, so the user netdev goes in
 * `<qemu:commandline>` (the one QEMU argument passthrough; libvirt marks
 * the domain tainted "custom-argv"). Its guestfwd runs
 * `socat - TCP:127.0.0.1:$(cat /var/lib/libvirt/ballast/agent-port)` in the
 * QEMU process, so each host's file names its own coordinator. Operators'
 * domains use the virtio-serial channel instead (README, "Deploying on a
 * libvirt host").
 *
 * Teardown destroys every domain through its daemon, kills what is left by
 * the QEMU pid files, stops each daemon by its PID and removes the work dir.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { randomUUID } from "node:crypto";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { execa } from "execa";
import { MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { MigrationService, type MigrateRequestSchema, type Migration } from "../gen/ballast/v1/migration_pb.js";
import { VmService, type Vm } from "../gen/ballast/v1/vm_pb.js";
import { FailedPreconditionError, UnavailableError, errorMessage } from "../shared/errors.js";
import { createClient, type Client } from "../shared/grpc-adapter.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { freePorts } from "../shared/net.js";
import { cleanVirshError } from "../coordinator/virsh-parse.js";
import { startCoordinatorProcess, waitForVm, type CoordinatorProcess } from "./coordinator-process.js";
import { ensureGuestImage, type GuestImage } from "./guest-image.js";
import { ensureLibvirtPackages } from "./preflight.js";
import { GuestShell } from "./serial-shell.js";
import { GUEST_COORDINATOR_ADDR, kernelAppend } from "./vm.js";

/** A lab host name. */
export type HostName = "a" | "b";

const ROOT = resolve(import.meta.dirname, "..");
const VM_NAME = "vm1";
/** Inside each daemon's mount namespace: this host's lab files (serial socket, agent port). */
const HOST_LAB_DIR = "/var/lib/libvirt/ballast";

/** One libvirt daemon of the lab. */
export interface LibvirtHost {
  name: HostName;
  /** This host's folder in the work dir: etc, run, lib, cache, log. */
  dir: string;
  /** The daemon's URI from outside its namespace. */
  uri: string;
  /** libvirtd's PID. */
  pid: number;
  /** `host_uuid` in its libvirtd.conf. */
  hostUuid: string;
  /** A path inside the daemon's namespace as seen from outside (e.g. /var/lib/libvirt/x → <dir>/lib/x). */
  outside(path: string): string;
  /** `virsh -c URI ARGS`; rejects with virsh's cleaned stderr. */
  virsh(args: string[], timeoutMs?: number): Promise<string>;
  /** Destroys its domains, kills leftover QEMUs by PID, stops the daemon by PID. */
  stop(): Promise<void>;
}

const MOUNTS: ReadonlyArray<[string, string]> = [
  ["etc", "/etc/libvirt"],
  ["run", "/run/libvirt"],
  ["lib", "/var/lib/libvirt"],
  ["cache", "/var/cache/libvirt"],
  ["log", "/var/log/libvirt"],
];

/** The users and groups libvirtd looks up even when qemu.conf says root, and the folders it expects. */
async function prepareHost(): Promise<void> {
  const has = async (db: string, key: string) => (await execa("getent", [db, key], { reject: false })).exitCode === 0;
  if (!(await has("group", "kvm"))) await execa("groupadd", ["-r", "kvm"]);
  if (!(await has("group", "libvirt-qemu"))) await execa("groupadd", ["-r", "libvirt-qemu"]);
  if (!(await has("passwd", "libvirt-qemu"))) {
    await execa("useradd", ["-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin", "libvirt-qemu"]);
  }
  // Mount points for the bind mounts (empty folders; nothing is written into the host's own).
  for (const [, target] of MOUNTS) mkdirSync(target, { recursive: true });
}

function virshRunner(uri: string) {
  return async (args: string[], timeoutMs = 30_000): Promise<string> => {
    const r = await execa("virsh", ["-c", uri, ...args], { reject: false, timeout: timeoutMs, env: { LC_ALL: "C" }, stdin: "ignore" });
    if (r.exitCode === 0) return r.stdout;
    throw new FailedPreconditionError(`virsh -c ${uri} ${args.join(" ")}: ${r.timedOut ? `no answer in ${timeoutMs} ms` : cleanVirshError(r.stderr) || `exit ${r.exitCode}`}`);
  };
}

/** Starts one libvirt daemon in its own mount and UTS namespace, all its state under `dir`. */
async function startDaemon(name: HostName, dir: string, portBase: number, log: Logger): Promise<LibvirtHost> {
  for (const [sub] of MOUNTS) mkdirSync(join(dir, sub), { recursive: true });
  mkdirSync(join(dir, "log", "qemu"), { recursive: true });
  mkdirSync(join(dir, "lib", "ballast"), { recursive: true });
  const hostUuid = randomUUID();
  writeFileSync(
    join(dir, "etc", "libvirtd.conf"),
    [`unix_sock_group = "root"`, `unix_sock_rw_perms = "0770"`, `auth_unix_ro = "none"`, `auth_unix_rw = "none"`, `host_uuid = "${hostUuid}"`, ""].join("\n"),
  );
  writeFileSync(
    join(dir, "etc", "qemu.conf"),
    [
      `user = "root"`,
      `group = "root"`,
      `security_driver = "none"`,
      `stdio_handler = "file"`,
      // Without this both daemons share one cgroup tree and their domain ids collide.
      `cgroup_controllers = [ ]`,
      // libvirt's default QEMU sandbox (-sandbox spawn=deny) kills QEMU when slirp's guestfwd forks its socat.
      `seccomp_sandbox = 0`,
      `migration_port_min = ${portBase}`,
      `migration_port_max = ${portBase + 63}`,
      "",
    ].join("\n"),
  );
  const binds = MOUNTS.map(([sub, target]) => `mount --bind ${join(dir, sub)} ${target}`).join(" && ");
  const script = `${binds} && hostname host${name} && exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid`;
  const logFd = openSync(join(dir, "libvirtd.log"), "w");
  const child: ChildProcess = spawn("unshare", ["--mount", "--uts", "--propagation", "private", "sh", "-c", script], { stdio: ["ignore", logFd, logFd] });
  closeSync(logFd);
  const pid = child.pid;
  if (pid === undefined) throw new UnavailableError(`libvirt lab: could not start libvirtd for host ${name}`);
  let exited = false;
  const exit = new Promise<void>((r) => child.once("exit", () => ((exited = true), r())));
  const uri = `qemu+unix:///system?socket=${join(dir, "run", "libvirt-sock")}`;
  const virsh = virshRunner(uri);
  log.info({ host: name, pid, uri }, "libvirtd started");

  const outside = (p: string): string => {
    for (const [sub, target] of MOUNTS) if (p === target || p.startsWith(`${target}/`)) return join(dir, sub, p.slice(target.length));
    return p;
  };
  const stop = async (): Promise<void> => {
    if (!exited) {
      try {
        const names = (await virsh(["list", "--name"], 10_000)).split("\n").map((s) => s.trim()).filter(Boolean);
        for (const d of names) await virsh(["destroy", d], 20_000).catch((err: unknown) => log.warn({ err: errorMessage(err) }, "destroy failed"));
      } catch (err) {
        log.warn({ host: name, err: errorMessage(err) }, "could not list domains at teardown");
      }
    }
    // QEMUs outlive their daemon: kill any left by the pid files libvirt keeps.
    const qemuRun = join(dir, "run", "qemu");
    if (existsSync(qemuRun)) {
      for (const f of readdirSync(qemuRun).filter((x) => x.endsWith(".pid"))) {
        const qpid = Number(readFileSync(join(qemuRun, f), "utf8").trim());
        if (Number.isInteger(qpid) && qpid > 1) killPid(qpid, "SIGKILL");
      }
    }
    if (!exited) {
      killPid(pid, "SIGTERM");
      const t = setTimeout(() => killPid(pid, "SIGKILL"), 10_000);
      await exit;
      clearTimeout(t);
    }
  };

  // The first start probes QEMU's capabilities (about 8 s here).
  const until = Date.now() + 60_000;
  for (;;) {
    if (exited) throw new UnavailableError(`libvirt lab: libvirtd for host ${name} exited at start: ${tail(join(dir, "libvirtd.log"))}`);
    try {
      await virsh(["version"], 30_000);
      break;
    } catch (err) {
      if (Date.now() > until) {
        await stop();
        throw new UnavailableError(`libvirt lab: libvirtd for host ${name} did not answer in 60 s: ${errorMessage(err)}; ${tail(join(dir, "libvirtd.log"))}`);
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  return { name, dir, uri, pid, hostUuid, outside, virsh, stop };
}

/** Options for {@link startLibvirtHosts}. */
export interface LibvirtHostsOptions {
  logger?: Logger;
  onProgress?: (step: string) => void;
}

/** Installs what is missing and starts the two daemons (in parallel) under `workDir`. */
export async function startLibvirtHosts(workDir: string, options: LibvirtHostsOptions = {}): Promise<Record<HostName, LibvirtHost>> {
  const log = (options.logger ?? silentLogger()).child({ component: "libvirt-lab" });
  await ensureLibvirtPackages({ onProgress: options.onProgress, logger: options.logger });
  await prepareHost();
  options.onProgress?.("starting libvirt daemons for host a and host b (the first start probes QEMU, about 8 s)");
  const [a, b] = await Promise.allSettled([startDaemon("a", join(workDir, "a"), 49200, log), startDaemon("b", join(workDir, "b"), 49300, log)]);
  if (a.status === "rejected" || b.status === "rejected") {
    await Promise.all([a, b].map((r) => (r.status === "fulfilled" ? r.value.stop() : undefined)));
    throw (a.status === "rejected" ? a.reason : (b as PromiseRejectedResult).reason) as Error;
  }
  return { a: a.value, b: b.value };
}

/** Options for {@link domainXml}. */
export interface DomainXmlOptions {
  name: string;
  image: GuestImage;
  memMiB?: number;
  dataDisk?: boolean;
  /** Run the agent in the guest. Default true. */
  agent?: boolean;
  freePageReporting?: boolean;
}

const xmlEscape = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/'/g, "&apos;").replace(/"/g, "&quot;");

/**
 * The lab guest's domain XML. Everything is native libvirt XML except the
 * user network with guestfwd (see the file comment): the only
 * `<qemu:commandline>` use, which taints the domain "custom-argv".
 */
export function domainXml(o: DomainXmlOptions): string {
  const mem = o.memMiB ?? 1024;
  const disk = (file: string, dev: string) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${xmlEscape(file)}'/>
      <target dev='${dev}' bus='virtio'/>
      <readonly/>
    </disk>`;
  const guestfwd = `guestfwd=tcp:${GUEST_COORDINATOR_ADDR}-cmd:sh -c "exec socat - TCP:127.0.0.1:$(cat ${HOST_LAB_DIR}/agent-port)"`;
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${xmlEscape(o.name)}</name>
  <memory unit='MiB'>${mem}</memory>
  <currentMemory unit='MiB'>${mem}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${xmlEscape(o.image.kernel)}</kernel>
    <initrd>${xmlEscape(o.image.initrd)}</initrd>
    <cmdline>${xmlEscape(kernelAppend({ name: o.name, vmId: o.name, agent: o.agent }))}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${disk(o.image.rootfs, "vda")}
${o.dataDisk === false ? "" : disk(o.image.dataDisk, "vdb")}
    <controller type='usb' model='none'/>
    <serial type='unix'>
      <source mode='bind' path='${HOST_LAB_DIR}/${xmlEscape(o.name)}.serial.sock'/>
      <log file='/var/log/libvirt/${xmlEscape(o.name)}.serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='virtio' autodeflate='on'${o.freePageReporting ? " freePageReporting='on'" : ""}>
      <stats period='2'/>
    </memballoon>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='${xmlEscape(`user,id=n0,restrict=on,ipv6=off,${guestfwd}`)}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=n0,romfile=,bus=pcie.0,addr=0x10'/>
  </qemu:commandline>
</domain>
`;
}

/** Points `host`'s guestfwd (read by the guest's QEMU on each new connection) at `port`. */
export function setAgentPort(host: LibvirtHost, port: number): void {
  writeFileSync(host.outside(`${HOST_LAB_DIR}/agent-port`), `${port}\n`);
}

/** The serial console socket of domain `name` on `host`, as seen from outside. */
export function serialSocket(host: LibvirtHost, name: string): string {
  return host.outside(`${HOST_LAB_DIR}/${name}.serial.sock`);
}

/** Creates the transient domain on `host` and waits for its serial socket. */
export async function createDomain(host: LibvirtHost, xml: string, name: string, workDir: string): Promise<void> {
  const file = join(workDir, `${name}-${host.name}.xml`);
  writeFileSync(file, xml);
  await host.virsh(["create", file], 60_000);
  const sock = serialSocket(host, name);
  const until = Date.now() + 20_000;
  while (!existsSync(sock)) {
    if (Date.now() > until) throw new UnavailableError(`libvirt lab: no serial socket ${sock} 20 s after creating ${name}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Options for {@link LibvirtLab.start}. */
export interface LibvirtLabOptions {
  /** Default: a fresh folder in /tmp (short, for unix socket paths). */
  workDir?: string;
  /** Guest RAM. Default 1024 MiB. */
  memMiB?: number;
  /** Attach the 500 MiB data disk as /dev/vdb. Default true. */
  dataDisk?: boolean;
  /** Run the guest agent. Default true. */
  agent?: boolean;
  freePageReporting?: boolean;
  /** Coordinators tell agents to self-balloon outside migrations. Default false. */
  steadyState?: boolean;
  sampleIntervalMs?: number;
  /** Balloon floor. Default "256MiB". */
  floor?: string;
  image?: GuestImage;
  onProgress?: (step: string) => void;
  logger?: Logger;
}

/** One host of the libvirt lab: a daemon and a coordinator. */
export interface LibvirtLabHost {
  name: HostName;
  libvirt: LibvirtHost;
  coordinator: CoordinatorProcess;
  agentPort: number;
  migrations: Client<typeof MigrationService>;
  vms: Client<typeof VmService>;
}

/** A running two-daemon libvirt lab with one guest. */
export class LibvirtLab {
  /** The host the guest runs on now. */
  active: HostName = "a";
  /** The root shell on the guest's serial console (it follows the guest). */
  shell!: GuestShell;
  private shellHost: HostName | undefined;
  private readonly log: Logger;

  private constructor(
    readonly hosts: Record<HostName, LibvirtLabHost>,
    readonly image: GuestImage,
    readonly workDir: string,
    private readonly options: LibvirtLabOptions,
    private readonly ownsWorkDir: boolean,
  ) {
    this.log = (options.logger ?? silentLogger()).child({ component: "libvirt-lab" });
  }

  /** Starts both daemons and coordinators and boots the guest on host a through libvirt. */
  static async start(options: LibvirtLabOptions = {}): Promise<LibvirtLab> {
    const progress = options.onProgress ?? (() => {});
    const image = options.image ?? (await ensureGuestImage({ agentBundle: join(ROOT, "dist/ballast-agent.mjs"), onProgress: progress, logger: options.logger }));
    const ownsWorkDir = options.workDir === undefined;
    const workDir = resolve(options.workDir ?? mkdtempSync(join(tmpdir(), "blv-")));
    mkdirSync(workDir, { recursive: true });
    let daemons: Record<HostName, LibvirtHost> | undefined;
    const coordinators: CoordinatorProcess[] = [];
    try {
      daemons = await startLibvirtHosts(workDir, { logger: options.logger, onProgress: progress });
      const [portA, portB, listenA, listenB] = (await freePorts(4)) as [number, number, number, number];
      progress("starting coordinators on host a and host b");
      const host = async (name: HostName, agentPort: number, listenPort: number): Promise<LibvirtLabHost> => {
        const libvirt = (daemons as Record<HostName, LibvirtHost>)[name];
        setAgentPort(libvirt, agentPort);
        const stateDir = join(workDir, `state-${name}`);
        mkdirSync(stateDir, { recursive: true });
        const coordinator = await startCoordinatorProcess(workDir, `coordinator-${name}`, {
          hostId: `host-${name}`,
          listen: `127.0.0.1:${listenPort}`,
          stateDir,
          defaults: { steadyState: options.steadyState ?? false, sampleIntervalMs: options.sampleIntervalMs ?? 1000 },
          vms: [{ name: VM_NAME, libvirt: { uri: libvirt.uri, domain: VM_NAME }, agentId: VM_NAME, floor: options.floor ?? "256MiB", agentPort }],
        });
        coordinators.push(coordinator);
        return { name, libvirt, coordinator, agentPort, migrations: createClient(MigrationService, coordinator.address), vms: createClient(VmService, coordinator.address) };
      };
      const hosts = { a: await host("a", portA, listenA), b: await host("b", portB, listenB) };
      const lab = new LibvirtLab(hosts, image, workDir, options, ownsWorkDir);
      progress("creating the guest domain on host a");
      await createDomain(
        hosts.a.libvirt,
        domainXml({ name: VM_NAME, image, memMiB: options.memMiB, dataDisk: options.dataDisk, agent: options.agent, freePageReporting: options.freePageReporting }),
        VM_NAME,
        workDir,
      );
      lab.shell = await GuestShell.connect(serialSocket(hosts.a.libvirt, VM_NAME), { logger: options.logger });
      lab.shellHost = "a";
      await lab.shell.ready(120_000);
      await lab.waitVm("a", (vm) => vm.qmpConnected, "libvirt driver up on host a", 30_000);
      if (options.agent !== false) {
        progress("waiting for the guest agent to attach");
        await lab.waitVm("a", (vm) => vm.agentConnected, "agent attached on host a", 60_000);
      }
      return lab;
    } catch (err) {
      await Promise.all(coordinators.map((c) => c.stop()));
      if (daemons) await Promise.all(Object.values(daemons).map((d) => d.stop()));
      if (ownsWorkDir) rmSync(workDir, { recursive: true, force: true });
      throw err;
    }
  }

  /** The host the guest is not on. */
  get other(): HostName {
    return this.active === "a" ? "b" : "a";
  }

  /** Polls a host's GetVm until `pred` holds. */
  waitVm(host: HostName, pred: (vm: Vm) => boolean, what: string, timeoutMs = 30_000): Promise<Vm> {
    return waitForVm(this.hosts[host].vms, VM_NAME, pred, `${what} (libvirt lab)`, timeoutMs);
  }

  /** The VM as a host's coordinator sees it. */
  async vm(host: HostName = this.active): Promise<Vm> {
    const { vm } = await this.hosts[host].vms.getVm({ name: VM_NAME });
    if (!vm) throw new FailedPreconditionError("libvirt lab: coordinator returned no VM");
    return vm;
  }

  /** `virsh domstate --reason vm1` on a host, or "absent" when the domain is not there. */
  async domainState(host: HostName): Promise<string> {
    try {
      return (await this.hosts[host].libvirt.virsh(["domstate", "--reason", VM_NAME])).trim();
    } catch {
      return "absent";
    }
  }

  /**
   * Migrates the guest to the other host through the coordinators (which
   * drive libvirt) and returns the final record. On success the shell
   * follows the guest and, with an agent, this waits for its re-attach.
   * `onPostcopy` runs once at POSTCOPY_ACTIVE, with the shell already on
   * the destination.
   */
  async migrate(
    request: Omit<MessageInitShape<typeof MigrateRequestSchema>, "vm" | "destination" | "$typeName">,
    hooks: { onUpdate?: (m: Migration) => void; onPostcopy?: (shell: GuestShell) => Promise<void> } = {},
  ): Promise<Migration> {
    const from = this.hosts[this.active];
    const to = this.hosts[this.other];
    let last: Migration | undefined;
    let hook: Promise<void> | undefined;
    for await (const msg of from.migrations.migrate({ ...request, vm: VM_NAME, destination: to.coordinator.address })) {
      if (!msg.migration) continue;
      last = msg.migration;
      hooks.onUpdate?.(last);
      if (last.phase === Phase.POSTCOPY_ACTIVE && hooks.onPostcopy && !hook) {
        const run = hooks.onPostcopy;
        // The destination's console may drop the first bytes written while the guest switches over: wait for the
        // shell to answer there before the hook types anything.
        hook = this.moveShellTo(to.name)
          .then(() => this.shell.ready(60_000))
          .then(() => run(this.shell));
      }
    }
    if (hook) await hook;
    if (!last) throw new FailedPreconditionError("libvirt lab: migrate stream ended without a record");
    if (!isFinalPhase(last.phase)) {
      // The stream may end before the final record (seen once after a cancel): the record itself is authoritative.
      this.log.warn({ id: last.id, phase: Phase[last.phase] }, "migrate stream ended before the final record; reading it");
      const id = last.id;
      const until = Date.now() + 60_000;
      for (;;) {
        const { migration } = await from.migrations.getMigration({ id });
        if (migration) last = migration;
        if (isFinalPhase(last.phase)) break;
        if (Date.now() > until) throw new FailedPreconditionError(`libvirt lab: migration ${id} not final after 60 s (${Phase[last.phase]})`);
        await new Promise((r) => setTimeout(r, 200));
      }
      hooks.onUpdate?.(last);
    }
    if (last.phase !== Phase.COMPLETED) {
      this.log.warn({ phase: Phase[last.phase], error: last.error }, "migration did not complete; guest stays on the source");
      return last;
    }
    this.active = to.name;
    await this.moveShellTo(to.name);
    await this.shell.ready(60_000);
    if (this.options.agent !== false) await this.waitVm(to.name, (vm) => vm.agentConnected, `agent re-attached on host ${to.name}`, 60_000);
    return last;
  }

  private async moveShellTo(host: HostName): Promise<void> {
    if (this.shellHost === host) return;
    this.shell.close();
    this.shell = await GuestShell.connect(serialSocket(this.hosts[host].libvirt, VM_NAME), { logger: this.options.logger });
    this.shellHost = host;
  }

  /** Stops coordinators, destroys the domains, stops both daemons by PID, removes the work dir if it made it. */
  async stop(): Promise<void> {
    this.shell?.close();
    for (const h of Object.values(this.hosts)) {
      h.migrations.close();
      h.vms.close();
    }
    await Promise.all(Object.values(this.hosts).map((h) => h.coordinator.stop()));
    await Promise.all(Object.values(this.hosts).map((h) => h.libvirt.stop()));
    if (this.ownsWorkDir) rmSync(this.workDir, { recursive: true, force: true });
  }
}

function isFinalPhase(p: Phase): boolean {
  return p === Phase.COMPLETED || p === Phase.FAILED || p === Phase.CANCELLED;
}

function killPid(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ESRCH") throw err;
  }
}

function tail(file: string): string {
  try {
    const t = readFileSync(file, "utf8").trim();
    return t.length > 1500 ? `…${t.slice(-1500)}` : t || "(empty log)";
  } catch {
    return "(no log)";
  }
}

export { MigrationMode, Phase };
