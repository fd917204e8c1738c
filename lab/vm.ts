/**
 * Starts one lab QEMU process (TCG, q35) for a guest image from
 * guest-image.ts. The important invariants of the command line are:
 *
 * - `-nodefaults` always. The agent's channel is a virtio-serial port named
 *   `org.ballast.agent.0` (`id=agentport`, so QMP emits VSERPORT_CHANGE)
 *   whose host end is the unix socket `<name>.agent.sock`; this host's
 *   coordinator connects to it (`vms[].agentSocket`). There is no network
 *   device unless `guestfwdPort` is given: then user networking with
 *   `restrict=on`, where the guest reaches only 10.0.2.100:50051, which QEMU
 *   forwards (one socat per guest connection) to 127.0.0.1:<guestfwdPort>
 *   (the older TCP channel, kept as an option).
 * - The migration destination is the *same* command plus `-incoming defer`:
 *   same devices, same device properties (free-page-reporting, data disk,
 *   network or not), same kernel/initrd/append. Build both sides with the
 *   same options apart from `name`, `guestfwdPort` and `incoming`.
 * - `free-page-hint` is never enabled: it crashed destination guests here.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import path from "node:path";
import { InvalidArgumentError, UnavailableError } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import type { GuestImage } from "./guest-image.js";
import { sleep } from "../shared/retry.js";

/** Options for {@link startVm}. */
export interface StartVmOptions {
  /** Short name, used for QEMU's -name and every file in workDir. [A-Za-z0-9_.-] only. */
  name: string;
  /** Directory for sockets, logs and the pid file. Keep it short: unix socket paths are limited to 107 bytes. */
  workDir: string;
  image: GuestImage;
  /** Guest RAM in MiB. Default 1024. */
  memMiB?: number;
  /**
   * Adds user networking whose only reachable address, 10.0.2.100:50051,
   * QEMU forwards to this port on 127.0.0.1 (the TCP agent channel). Default:
   * no network device; the agent uses its virtio-serial port.
   */
  guestfwdPort?: number;
  /** The agent's channel, passed as kernel arg ballast.channel (agent --channel). Default: the agent's own default (auto). */
  agentChannel?: "auto" | "virtio-serial" | "tcp";
  /** Start paused, waiting for `migrate-incoming` (adds `-incoming defer`). */
  incoming?: boolean;
  /** Adds free-page-reporting=on to the balloon. Must match on both migration sides. */
  freePageReporting?: boolean;
  /** Attach image.dataDisk read-only as the second virtio-blk disk (/dev/vdb). Must match on both sides. */
  dataDisk?: boolean;
  /** Passed to the guest agent as --vm-id (kernel arg ballast.vm_id). Default: `name`. */
  vmId?: string;
  /** Start the agent in the guest. Default true; false adds ballast.agent=0. */
  agent?: boolean;
  /** Extra kernel command line text, appended last. */
  extraAppend?: string;
  logger?: Logger;
}

/** A running QEMU process. */
export interface VmHandle {
  name: string;
  /** QEMU's PID (the direct child; also written to `<name>.pid`). */
  pid: number;
  /** QMP socket reserved for the coordinator. */
  qmpPath: string;
  /** Second QMP socket for tests and lab tools (QEMU serves one client per socket). */
  labQmpPath: string;
  /** Unix socket of the guest's serial console (ttyS0); see GuestShell. */
  serialPath: string;
  /** Unix socket of the agent's virtio-serial port (the coordinator's `agentSocket`). */
  agentSocket: string;
  /** Everything the guest printed on ttyS0, written by QEMU itself. */
  serialLog: string;
  /** QEMU's own stdout/stderr. */
  qemuLog: string;
  /** The exact QEMU argv (without the binary). */
  args: string[];
  /** The kernel command line given to the guest. */
  append: string;
  /** SIGTERM, then SIGKILL after a grace period; only this PID. Resolves once QEMU has exited. */
  stop(): Promise<void>;
  /** Resolves with QEMU's exit code (null when killed by a signal). */
  exited: Promise<number | null>;
}

/** The address and port the guest's agent dials; guestfwd maps it to the host. */
export const GUEST_COORDINATOR_ADDR = "10.0.2.100:50051";

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
const MAX_UNIX_PATH = 107;

/** Files a VM named `name` uses in `workDir`. */
export function vmPaths(workDir: string, name: string) {
  const base = path.join(path.resolve(workDir), name);
  return {
    qmpPath: `${base}.qmp`,
    labQmpPath: `${base}.lab.qmp`,
    serialPath: `${base}.serial.sock`,
    agentSocket: `${base}.agent.sock`,
    serialLog: `${base}.serial.log`,
    pidFile: `${base}.pid`,
    qemuLog: `${base}.qemu.log`,
  };
}

/** The kernel command line for these options. */
export function kernelAppend(options: Pick<StartVmOptions, "name" | "vmId" | "agent" | "agentChannel" | "extraAppend">): string {
  const parts = ["console=ttyS0", "quiet", "panic=-1", `ballast.vm_id=${options.vmId ?? options.name}`];
  if (options.agent === false) parts.push("ballast.agent=0");
  if (options.agentChannel) parts.push(`ballast.channel=${options.agentChannel}`);
  if (options.extraAppend) parts.push(options.extraAppend);
  return parts.join(" ");
}

/** Builds the QEMU argv for these options (exported so tools can show or compare both sides). */
export function qemuArgs(options: StartVmOptions): string[] {
  validate(options);
  const p = vmPaths(options.workDir, options.name);
  const balloon = ["virtio-balloon-pci", "id=balloon0", "deflate-on-oom=on"];
  if (options.freePageReporting) balloon.push("free-page-reporting=on");
  const args = [
    "-name", options.name,
    "-machine", "q35",
    "-accel", "tcg",
    "-cpu", "max",
    "-m", `${options.memMiB ?? 1024}M`,
    "-smp", "1",
    "-nodefaults",
    "-no-user-config",
    "-display", "none",
    "-vga", "none",
    "-no-reboot",
    "-kernel", options.image.kernel,
    "-initrd", options.image.initrd,
    "-append", kernelAppend(options),
    "-chardev", `socket,id=ser0,path=${p.serialPath},server=on,wait=off,logfile=${p.serialLog}`,
    "-serial", "chardev:ser0",
    "-qmp", `unix:${p.qmpPath},server=on,wait=off`,
    "-qmp", `unix:${p.labQmpPath},server=on,wait=off`,
    "-pidfile", p.pidFile,
    "-device", balloon.join(","),
    // The agent's channel (README "Agent channel"); QEMU serves the socket, the coordinator is its one client.
    "-device", "virtio-serial-pci,id=vser0",
    "-chardev", `socket,id=agentch,path=${p.agentSocket},server=on,wait=off`,
    "-device", "virtserialport,bus=vser0.0,chardev=agentch,name=org.ballast.agent.0,id=agentport",
    "-drive", `file=${options.image.rootfs},if=none,id=root0,format=raw,readonly=on`,
    "-device", "virtio-blk-pci,drive=root0",
  ];
  if (options.dataDisk) {
    args.push(
      "-drive", `file=${options.image.dataDisk},if=none,id=data0,format=raw,readonly=on`,
      "-device", "virtio-blk-pci,drive=data0",
    );
  }
  if (options.guestfwdPort !== undefined) {
    args.push(
      "-netdev",
      `user,id=n0,restrict=on,ipv6=off,guestfwd=tcp:${GUEST_COORDINATOR_ADDR}-cmd:socat - TCP:127.0.0.1:${options.guestfwdPort}`,
      "-device", "virtio-net-pci,netdev=n0,romfile=",
    );
  }
  if (options.incoming) args.push("-incoming", "defer");
  return args;
}

function validate(options: StartVmOptions): void {
  if (!NAME_RE.test(options.name)) throw new InvalidArgumentError(`startVm: name ${JSON.stringify(options.name)} must match ${NAME_RE}`);
  if (options.guestfwdPort !== undefined && (!Number.isInteger(options.guestfwdPort) || options.guestfwdPort < 1 || options.guestfwdPort > 65535)) {
    throw new InvalidArgumentError(`startVm: guestfwdPort must be a TCP port, got ${options.guestfwdPort}`);
  }
  const mem = options.memMiB ?? 1024;
  if (!Number.isInteger(mem) || mem < 128) throw new InvalidArgumentError(`startVm: memMiB must be an integer >= 128, got ${mem}`);
  if (options.vmId !== undefined && !/^[^\s]+$/.test(options.vmId)) throw new InvalidArgumentError("startVm: vmId must not contain whitespace");
  const p = vmPaths(options.workDir, options.name);
  // QEMU option values are comma-separated; a comma in a path would need ",," escaping.
  for (const file of [...Object.values(p), options.image.kernel, options.image.initrd, options.image.rootfs, options.image.dataDisk]) {
    if (file.includes(",")) throw new InvalidArgumentError(`startVm: path ${file} contains a comma`);
  }
  for (const sock of [p.qmpPath, p.labQmpPath, p.serialPath, p.agentSocket]) {
    if (Buffer.byteLength(sock) > MAX_UNIX_PATH) {
      throw new InvalidArgumentError(`startVm: socket path ${sock} is longer than ${MAX_UNIX_PATH} bytes; use a shorter workDir`);
    }
  }
}

/**
 * Starts QEMU and resolves once its QMP and serial sockets exist (the guest
 * is then booting, or waiting for `migrate-incoming` with `incoming`).
 */
export async function startVm(options: StartVmOptions): Promise<VmHandle> {
  const log = (options.logger ?? silentLogger()).child({ component: "lab-vm", vm: options.name });
  const args = qemuArgs(options);
  const p = vmPaths(options.workDir, options.name);
  mkdirSync(path.resolve(options.workDir), { recursive: true });
  // Remove leftovers so the readiness check below cannot see a stale socket.
  for (const f of [p.qmpPath, p.labQmpPath, p.serialPath, p.agentSocket, p.pidFile]) rmSync(f, { force: true });

  const logFd = openSync(p.qemuLog, "w");
  const child = spawn("qemu-system-x86_64", args, { stdio: ["ignore", logFd, logFd], detached: false });
  closeSync(logFd);
  const exited = new Promise<number | null>((resolve) => {
    child.once("exit", (code) => resolve(code));
    child.once("error", () => resolve(null));
  });
  const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));
  const pid = child.pid;
  if (pid === undefined) throw new UnavailableError(`startVm ${options.name}: ${(await spawnError).message}`);
  log.info({ pid, args }, "started qemu");

  let exitCode: number | null | undefined;
  void exited.then((code) => {
    exitCode = code;
    log.info({ pid, code }, "qemu exited");
  });

  const deadline = Date.now() + 20_000;
  while (![p.qmpPath, p.labQmpPath, p.serialPath, p.agentSocket].every((f) => existsSync(f))) {
    if (exitCode !== undefined) {
      throw new UnavailableError(`startVm ${options.name}: qemu exited (${exitCode}) during start: ${tailFile(p.qemuLog)}`);
    }
    if (Date.now() > deadline) {
      killPid(pid, "SIGKILL");
      throw new UnavailableError(`startVm ${options.name}: qemu did not create its sockets in 20 s: ${tailFile(p.qemuLog)}`);
    }
    await sleep(50);
  }

  const stop = async (): Promise<void> => {
    if (exitCode !== undefined) return;
    killPid(pid, "SIGTERM");
    const timedOut = await Promise.race([exited.then(() => false), sleep(5_000).then(() => true)]);
    if (timedOut) {
      log.warn({ pid }, "qemu ignored SIGTERM for 5 s, sending SIGKILL");
      killPid(pid, "SIGKILL");
      await exited;
    }
  };

  return {
    name: options.name,
    pid,
    qmpPath: p.qmpPath,
    labQmpPath: p.labQmpPath,
    serialPath: p.serialPath,
    agentSocket: p.agentSocket,
    serialLog: p.serialLog,
    qemuLog: p.qemuLog,
    args,
    append: kernelAppend(options),
    stop,
    exited,
  };
}

function killPid(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ESRCH") throw err;
  }
}

function tailFile(file: string): string {
  try {
    const text = readFileSync(file, "utf8").trim();
    return text.length > 1500 ? `…${text.slice(-1500)}` : text || "(no output)";
  } catch {
    return "(no log)";
  }
}
