/**
 * The one place that checks and installs the host packages the lab needs
 * (QEMU, a static busybox for the guest, socat for QEMU's guestfwd,
 * squashfs-tools for the images), and the one place that runs
 * `apt-get update` / `apt-get install`.
 *
 * Callers run it explicitly before they need the tools: the test run's
 * global setup (when QEMU tests are selected), `npm run demo`, `npm run lab`,
 * `npm run bench`, and `ensureGuestImage` (guest-image.ts) itself. When
 * everything is present it only looks at a few files; it installs with apt
 * only what is missing, and only as root.
 */
import { FailedPreconditionError, errorMessage } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { isStaticElf } from "./elf.js";
import { findCommand, isRoot, run, runSync } from "./host-exec.js";

/** A host command the lab runs, the Debian package that provides it, and why it is needed. */
export interface HostTool {
  command: string;
  pkg: string;
  why: string;
  /** The binary must be statically linked. */
  staticElf?: boolean;
}

/** Host tools and the Debian packages that provide them. */
export const HOST_TOOLS: readonly HostTool[] = [
  { command: "qemu-system-x86_64", pkg: "qemu-system-x86", why: "runs the lab guests and the QEMU tests" },
  // The same binary goes into the initramfs and the guest root, so it must not need host libraries.
  { command: "busybox", pkg: "busybox-static", why: "init, shell and tools of the guest's initramfs and root", staticElf: true },
  { command: "socat", pkg: "socat", why: "QEMU's guestfwd runs one socat per guest connection to the coordinator" },
  { command: "mksquashfs", pkg: "squashfs-tools", why: "builds the guest root and the data disk" },
  { command: "unsquashfs", pkg: "squashfs-tools", why: "checks the data disk after building it" },
];

/** The Debian packages {@link ensureHostPackages} installs when their commands are missing. */
export const HOST_PACKAGES: readonly string[] = [...new Set(HOST_TOOLS.map((t) => t.pkg))];

/** Commands a Debian-family host has without installing anything; the lab cannot install these itself. */
const BASE_COMMANDS: ReadonlyArray<{ command: string; why: string }> = [
  { command: "apt-get", why: "installs host packages and downloads the guest kernel" },
  { command: "apt-cache", why: "resolves the guest kernel through linux-image-amd64" },
  { command: "dpkg", why: "extracts the kernel package" },
  { command: "ldd", why: "lists the shared libraries node needs in the guest" },
];

/** Options for {@link ensureHostPackages}. */
export interface HostPackagesOptions {
  /** Called with a short human-readable step, e.g. "apt-get update". Only called when something is installed. */
  onProgress?: (step: string) => void;
  logger?: Logger;
}

/** A required tool that is absent (or present but unusable). */
export interface MissingTool extends HostTool {
  /** Set when the command exists but cannot be used, e.g. "found but dynamically linked". */
  problem?: string;
}

/** The required tools that are missing or unusable on this host; empty when the lab can run. */
export function missingHostTools(): MissingTool[] {
  const out: MissingTool[] = [];
  for (const tool of HOST_TOOLS) {
    const found = findCommand(tool.command);
    if (!found) out.push({ ...tool });
    else if (tool.staticElf && !isStaticElf(found)) out.push({ ...tool, problem: "found but dynamically linked" });
  }
  return out;
}

/**
 * Makes sure every command in {@link HOST_TOOLS} is present, installing the
 * missing packages with `apt-get update` and `apt-get install -y
 * --no-install-recommends` when running as root. Throws a
 * FailedPreconditionError naming each missing command, its package and why
 * the lab needs it when it cannot install them (not root, no apt, apt
 * failed). Returns the packages it installed (empty when nothing was missing).
 */
export async function ensureHostPackages(options: HostPackagesOptions = {}): Promise<string[]> {
  const log = (options.logger ?? silentLogger()).child({ component: "preflight" });
  const progress = (step: string) => {
    log.info({ step }, step);
    options.onProgress?.(step);
  };
  const missingBase = BASE_COMMANDS.filter((c) => !findCommand(c.command));
  if (missingBase.length > 0) {
    throw new FailedPreconditionError(
      `preflight: the lab needs a Debian-family host with apt; missing commands: ${missingBase.map((c) => `${c.command} (${c.why})`).join(", ")}`,
    );
  }
  const missing = missingHostTools();
  if (missing.length === 0) return [];

  const pkgs = [...new Set(missing.map((m) => m.pkg))];
  const what = describe(missing);
  const installCommand = `apt-get install -y --no-install-recommends ${pkgs.join(" ")}`;
  if (!isRoot()) {
    throw new FailedPreconditionError(
      `preflight: missing ${what}; installing needs root but this process runs as uid ${process.getuid?.()}. ` +
        `Run as root, or install them first: ${installCommand}`,
    );
  }
  try {
    await updatePackageLists(progress);
    progress(`installing packages: ${pkgs.join(" ")}`);
    await run("apt-get", ["install", "-y", "--no-install-recommends", ...pkgs], { env: aptEnv(), context: "preflight" });
  } catch (err) {
    throw new FailedPreconditionError(`preflight: could not install the packages for ${what}: ${errorMessage(err).replace(/^preflight: /, "")}`);
  }
  const still = missingHostTools();
  if (still.length > 0) {
    throw new FailedPreconditionError(`preflight: still missing after ${installCommand}: ${describe(still)}`);
  }
  log.info({ pkgs }, "installed host packages");
  return pkgs;
}

/**
 * Runs `apt-get update` (as root only; callers check {@link isRoot}).
 * `reason` is shown in the progress step, e.g. "kernel download failed".
 */
export async function updatePackageLists(onProgress: (step: string) => void, reason?: string): Promise<void> {
  onProgress(reason ? `apt-get update (${reason})` : "apt-get update");
  await run("apt-get", ["update"], { env: aptEnv(), context: "preflight" });
}

/** The environment for apt commands: never prompt. */
export function aptEnv(): NodeJS.ProcessEnv {
  return { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
}

function describe(tools: readonly MissingTool[]): string {
  return tools.map((m) => `${m.command}${m.problem ? ` (${m.problem})` : ""} from package ${m.pkg} (${m.why})`).join(", ");
}

/**
 * The libvirt lab's packages (lab/libvirt-lab.ts): the daemon, its QEMU
 * driver and virsh. Not `libvirt-daemon-system`: it pulls in systemd-sysv,
 * which replaces init. This minimal set ships no config files and no
 * `libvirt-qemu` user; the libvirt lab writes its own configs.
 */
export const LIBVIRT_PACKAGES: readonly string[] = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients"];

/** The packages of {@link LIBVIRT_PACKAGES} that dpkg does not report installed. */
export function missingLibvirtPackages(): string[] {
  return LIBVIRT_PACKAGES.filter((p) => {
    try {
      return !runSyncQuiet("dpkg-query", ["-W", "-f=${Status}", p]).includes("install ok installed");
    } catch {
      return true;
    }
  });
}

/**
 * Makes sure the libvirt lab's packages are installed (after the QEMU lab's,
 * {@link ensureHostPackages}), installing what is missing as root. Returns
 * the packages it installed.
 */
export async function ensureLibvirtPackages(options: HostPackagesOptions = {}): Promise<string[]> {
  const installed = await ensureHostPackages(options);
  const missing = missingLibvirtPackages();
  if (missing.length === 0) return installed;
  const installCommand = `apt-get install -y --no-install-recommends ${missing.join(" ")}`;
  if (!isRoot()) {
    throw new FailedPreconditionError(`preflight: the libvirt lab needs ${missing.join(", ")} and root to run two libvirt daemons; install them first: ${installCommand}`);
  }
  const progress = (step: string) => options.onProgress?.(step);
  try {
    await updatePackageLists(progress);
    progress(`installing packages: ${missing.join(" ")}`);
    await run("apt-get", ["install", "-y", "--no-install-recommends", ...missing], { env: aptEnv(), context: "preflight" });
  } catch (err) {
    throw new FailedPreconditionError(`preflight: could not install ${missing.join(" ")}: ${errorMessage(err).replace(/^preflight: /, "")}`);
  }
  const still = missingLibvirtPackages();
  if (still.length > 0) throw new FailedPreconditionError(`preflight: still missing after ${installCommand}: ${still.join(", ")}`);
  return [...installed, ...missing];
}

function runSyncQuiet(command: string, args: string[]): string {
  return runSync(command, args, "preflight");
}
