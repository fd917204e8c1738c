/**
 * The guest end of a virtio-serial port (virtio_console), as a Node stream.
 *
 * Finding it: every port shows up as `/sys/class/virtio-ports/<dev>/name`
 * (the `name=` of QEMU's `virtserialport`, libvirt's `<target name=...>`),
 * and its device is `/dev/<dev>`, e.g. `/dev/vport3p1`. Nothing here needs
 * udev: devtmpfs creates the node, and when it is missing (a /dev without
 * devtmpfs) it is made with mknod from `/sys/class/virtio-ports/<dev>/dev`
 * (`major:minor`).
 *
 * Opening it: Node has no public API for a pollable character device.
 * - `fs.createReadStream` reads on a libuv threadpool thread; a read() on
 *   the port blocks in the kernel until the host sends something, so that
 *   thread is parked and the process cannot exit (SIGTERM hangs until the
 *   host end closes). Measured on the rig.
 * - `new net.Socket({ fd })` refuses the fd with ERR_INVALID_FD_TYPE:
 *   libuv's uv_guess_handle() calls every non-tty character device a FILE.
 * - `tty.ReadStream` refuses it too (uv_tty_init wants a tty).
 * What works: open the device `O_RDWR | O_NONBLOCK` and hand the fd to a
 * libuv *pipe* handle (`uv_pipe_open`), which puts it in the event loop's
 * epoll set like any socket; virtio_console implements poll(), so reads
 * and writes are readiness-driven and nothing blocks a thread. The process
 * exits within milliseconds on SIGTERM.
 *
 * What this relies on (checked on Node 18.20 and 20.20, see
 * test/unit/virtio-port.test.ts): `process.binding("pipe_wrap")` is on
 * Node's allow-list of legacy bindings (DEP0111 is a documentation-only
 * deprecation for it: no runtime warning), its `Pipe` class with
 * `constants.SOCKET` and `open(fd)` returning a libuv status, and
 * `net.Socket`'s `handle` option (documented, used by Node itself for
 * child-process pipes). It is the same mechanism Node uses for `stdio`
 * pipes. If a future Node drops `pipe_wrap` from the allow-list, this
 * module throws a clear error and the agent can still use `--channel tcp`.
 */
import { execFileSync } from "node:child_process";
import { closeSync, constants as fsConstants, existsSync, openSync, readFileSync, readdirSync, statSync } from "node:fs";
import { Socket } from "node:net";
import path from "node:path";
import { ActionError } from "./errors.js";

/** The port name Ballast's agent channel uses (QEMU `virtserialport name=`, libvirt `<target type='virtio' name=...>`). */
export const AGENT_PORT_NAME = "org.ballast.agent.0";

/** A virtio-serial port found in sysfs. */
export interface VirtioPortInfo {
  /** The port's name, e.g. "org.ballast.agent.0". */
  name: string;
  /** The sysfs/dev name, e.g. "vport3p1". */
  device: string;
  /** `/dev/<device>` (under devRoot). */
  devPath: string;
  /** From `/sys/class/virtio-ports/<device>/dev`. */
  major: number;
  minor: number;
}

/** Where to look; tests point these at a fake tree. */
export interface VirtioPortRoots {
  /** Default "/sys". */
  sysRoot?: string;
  /** Default "/dev". */
  devRoot?: string;
}

/** Finds the port named `name`, or undefined when the guest has none (no device, or virtio_console not loaded). */
export function findVirtioPort(name: string, roots: VirtioPortRoots = {}): VirtioPortInfo | undefined {
  const classDir = path.join(roots.sysRoot ?? "/sys", "class/virtio-ports");
  let entries: string[];
  try {
    entries = readdirSync(classDir).sort();
  } catch {
    return undefined;
  }
  for (const device of entries) {
    let portName: string;
    try {
      portName = readFileSync(path.join(classDir, device, "name"), "utf8").trim();
    } catch {
      continue;
    }
    if (portName !== name) continue;
    const dev = readFileSync(path.join(classDir, device, "dev"), "utf8").trim();
    const m = /^(\d+):(\d+)$/.exec(dev);
    if (!m) throw new ActionError(`${path.join(classDir, device, "dev")}: expected major:minor, got ${JSON.stringify(dev)}`);
    return { name, device, devPath: path.join(roots.devRoot ?? "/dev", device), major: Number(m[1]), minor: Number(m[2]) };
  }
  return undefined;
}

/**
 * Makes sure `port.devPath` is the port's character device: creates it with
 * mknod (busybox or coreutils) when it is missing, as udev would.
 */
export function ensureDeviceNode(port: VirtioPortInfo): void {
  if (existsSync(port.devPath)) {
    const st = statSync(port.devPath);
    if (!st.isCharacterDevice()) throw new ActionError(`${port.devPath} exists but is not a character device`);
    return;
  }
  try {
    execFileSync("mknod", ["-m", "0600", port.devPath, "c", String(port.major), String(port.minor)], { stdio: ["ignore", "ignore", "pipe"] });
  } catch (err) {
    const stderr = (err as { stderr?: Buffer }).stderr?.toString().trim();
    throw new ActionError(`cannot create ${port.devPath} (c ${port.major}:${port.minor}) for virtio port ${port.name}: ${stderr || String(err)}`, { cause: err });
  }
}

interface PipeHandle {
  open(fd: number): number;
}
interface PipeWrapBinding {
  Pipe: new (type: number) => PipeHandle;
  constants: { SOCKET: number };
}

function pipeWrap(): PipeWrapBinding {
  let binding: PipeWrapBinding;
  try {
    binding = (process as unknown as { binding(name: string): PipeWrapBinding }).binding("pipe_wrap");
  } catch (err) {
    throw new ActionError(`this Node (${process.version}) does not expose pipe_wrap; use --channel tcp`, { cause: err });
  }
  if (typeof binding?.Pipe !== "function" || typeof binding.constants?.SOCKET !== "number") {
    throw new ActionError(`this Node (${process.version}) has an unexpected pipe_wrap binding; use --channel tcp`);
  }
  return binding;
}

/**
 * Opens a pollable character device (or a FIFO, for tests) as a duplex
 * `net.Socket` driven by the event loop. `destroy()` closes the fd.
 * Throws ActionError when the device cannot be opened.
 */
export function openPollableDevice(devPath: string): Socket {
  const { Pipe, constants } = pipeWrap();
  let fd: number;
  try {
    fd = openSync(devPath, fsConstants.O_RDWR | fsConstants.O_NONBLOCK | fsConstants.O_NOCTTY);
  } catch (err) {
    throw new ActionError(`cannot open ${devPath}: ${(err as Error).message}`, { cause: err });
  }
  const handle = new Pipe(constants.SOCKET);
  const status = handle.open(fd);
  if (status !== 0) {
    closeSync(fd);
    throw new ActionError(`cannot watch ${devPath} in the event loop (uv_pipe_open: ${status})`);
  }
  return new Socket({ handle, readable: true, writable: true } as unknown as ConstructorParameters<typeof Socket>[0]);
}

/** Finds the port by name, creates its node if needed and opens it. Throws ActionError when it is not there. */
export function openVirtioPort(name: string = AGENT_PORT_NAME, roots: VirtioPortRoots = {}): { port: VirtioPortInfo; socket: Socket } {
  const port = findVirtioPort(name, roots);
  if (!port) throw new ActionError(`no virtio-serial port named ${name} (looked in ${path.join(roots.sysRoot ?? "/sys", "class/virtio-ports")})`);
  ensureDeviceNode(port);
  return { port, socket: openPollableDevice(port.devPath) };
}
