/**
 * The guest's read-only root filesystem, staged in a host directory for
 * mksquashfs: busybox and its applet links, node with the shared libraries
 * it loads (at the host's paths, so the guest's dynamic loader finds them),
 * the agent bundle, the workload script and the init scripts from
 * `lab/guest/`.
 *
 * Why a squashfs root: node then pages in as reclaimable page cache, which
 * is what a production guest looks like; copying node into a tmpfs or the
 * initramfs would add ~105 MiB of unreclaimable Shmem and distort every
 * balloon number.
 */
import { chmodSync, copyFileSync, existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { FailedPreconditionError } from "../shared/errors.js";
import { runSync } from "./host-exec.js";

/** Guest paths of the programs installed in the root image. */
export const GUEST_AGENT_PATH = "/opt/ballast/ballast-agent.mjs";
/** See {@link GUEST_AGENT_PATH}. */
export const GUEST_WORKLOAD_PATH = "/opt/ballast/workload.mjs";
/** Where the data disk is mounted in the guest (by rc.sysinit). */
export const GUEST_DATA_MOUNT = "/data";

/** The folder of guest-side files (init scripts, workload) in this repository. */
export const GUEST_DIR = fileURLToPath(new URL("./guest/", import.meta.url));
/** The files of {@link GUEST_DIR} that go into the image; their contents are hashed into the image key. */
export const GUEST_FILE_NAMES = ["initramfs-init.sh", "rc-sysinit.sh", "agent-supervisor.sh", "inittab", "profile", "workload.mjs"] as const;

/** What {@link populateRoot} copies into the root. */
export interface RootInputs {
  /** The host's node binary (real path), copied with its libraries. */
  nodeBinary: string;
  /** Absolute paths of node's shared libraries and ELF interpreter, from {@link sharedLibraries}. */
  libs: string[];
  /** A static busybox. */
  busybox: string;
  agentBundle: string;
  /** Contents of {@link GUEST_FILE_NAMES} by name. */
  guestFiles: Record<string, string>;
}

/** Reads {@link GUEST_FILE_NAMES} from {@link GUEST_DIR}. */
export function loadGuestFiles(): Record<string, string> {
  const guestFiles: Record<string, string> = {};
  for (const name of GUEST_FILE_NAMES) guestFiles[name] = readFileSync(path.join(GUEST_DIR, name), "utf8");
  return guestFiles;
}

/** One loaded guest file; throws if it was not loaded. */
export function requireGuestFile(guestFiles: Record<string, string>, name: string): string {
  const text = guestFiles[name];
  if (text === undefined) throw new Error(`guest file ${name} not loaded`);
  return text;
}

/** The absolute library paths (and the ELF interpreter) a dynamic binary loads, from ldd. */
export function sharedLibraries(binary: string): string[] {
  const out = runSync("ldd", [binary]);
  const libs: string[] = [];
  for (const line of out.split("\n")) {
    if (/not found/.test(line)) throw new FailedPreconditionError(`ensureGuestImage: ldd ${binary}: ${line.trim()}`);
    const arrow = /=>\s*(\/\S+)/.exec(line);
    const bare = /^\s*(\/\S+)\s+\(/.exec(line);
    const lib = arrow?.[1] ?? bare?.[1];
    if (lib) libs.push(lib);
  }
  return [...new Set(libs)];
}

/** busybox's applet names (`busybox --list`), e.g. "sh", "insmod". */
export function busyboxApplets(busybox: string): string[] {
  return runSync(busybox, ["--list"])
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
}

/** busybox's applets with their install paths (`busybox --list-full`), e.g. "bin/sh", "sbin/insmod". */
export function busyboxAppletPaths(busybox: string): string[] {
  return runSync(busybox, ["--list-full"])
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
}

/** Fills `stagingDir` with the guest root (see the file comment); mksquashfs then packs it as is. */
export function populateRoot(stagingDir: string, inputs: RootInputs): void {
  const root = new Staging(stagingDir);
  // Mirror the host's top-level layout first (merged /usr or not), so the
  // absolute symlinks copied with node's libraries resolve the same way.
  for (const dir of ["/bin", "/sbin", "/lib", "/lib64", "/usr/bin", "/usr/sbin", "/usr/lib"]) {
    if (existsSync(dir)) root.mirrorHost(dir);
  }
  root.mirrorHost(inputs.nodeBinary);
  for (const lib of inputs.libs) root.mirrorHost(lib);
  if (!root.exists("/usr/bin/node")) root.symlink("/usr/bin/node", inputs.nodeBinary);

  root.writeFile("/bin/busybox", readFileSync(inputs.busybox), 0o755);
  for (const rel of busyboxAppletPaths(inputs.busybox)) {
    const guestPath = `/${rel}`;
    if (guestPath === "/linuxrc" || root.exists(guestPath)) continue;
    root.symlink(guestPath, "/bin/busybox");
  }

  for (const dir of ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/mnt", GUEST_DATA_MOUNT, "/var", "/opt/ballast", "/etc/ballast", "/usr/local/bin"]) root.mkdirp(dir);
  root.symlink("/var/tmp", "/tmp");
  root.symlink("/var/run", "/run");
  root.symlink("/var/log", "/tmp");

  root.writeFile("/etc/inittab", requireGuestFile(inputs.guestFiles, "inittab"), 0o644);
  root.writeFile("/etc/profile", requireGuestFile(inputs.guestFiles, "profile"), 0o644);
  root.writeFile("/etc/ballast/rc.sysinit", requireGuestFile(inputs.guestFiles, "rc-sysinit.sh"), 0o755);
  root.writeFile("/etc/ballast/agent-supervisor", requireGuestFile(inputs.guestFiles, "agent-supervisor.sh"), 0o755);
  root.writeFile("/etc/passwd", "root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644);
  root.writeFile("/etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644);
  root.writeFile("/etc/hosts", "127.0.0.1 localhost\n10.0.2.15 ballast-guest\n", 0o644);
  root.writeFile("/etc/hostname", "ballast-guest\n", 0o644);
  root.writeFile("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n", 0o644);

  root.writeFile(GUEST_AGENT_PATH, readFileSync(inputs.agentBundle), 0o755);
  root.writeFile(GUEST_WORKLOAD_PATH, requireGuestFile(inputs.guestFiles, "workload.mjs"), 0o755);
  root.writeFile("/usr/local/bin/ballast-agent", `#!/bin/sh\nexec node ${GUEST_AGENT_PATH} "$@"\n`, 0o755);
  root.writeFile("/usr/local/bin/workload", `#!/bin/sh\nexec node ${GUEST_WORKLOAD_PATH} "$@"\n`, 0o755);
}

/**
 * A directory being filled as a future root filesystem. Guest paths are
 * resolved inside it, following symlinks *within* the staging tree (absolute
 * targets are re-rooted), so writing never escapes onto the host through a
 * copied absolute link such as /lib64/ld-linux-x86-64.so.2.
 */
export class Staging {
  constructor(private readonly dir: string) {
    mkdirSync(dir, { recursive: true });
  }

  private hostPath(guestPath: string): string {
    return path.join(this.dir, guestPath);
  }

  /** Resolves a guest path's directories inside the staging tree; the last component is not followed. */
  private resolveParent(guestPath: string): string {
    const parts = path.posix.normalize(guestPath).split("/").filter(Boolean);
    const last = parts.pop();
    if (last === undefined) return "/";
    return path.posix.join(this.resolveDir(parts), last);
  }

  /** Walks directory components, following staging symlinks; returns a symlink-free guest path. */
  private resolveDir(parts: string[], depth = 0): string {
    if (depth > 40) throw new Error("staging: too many symlinks");
    let cur = "/";
    for (let i = 0; i < parts.length; i++) {
      const next = path.posix.join(cur, parts[i] ?? "");
      let st;
      try {
        st = lstatSync(this.hostPath(next));
      } catch {
        cur = next;
        continue;
      }
      if (st.isSymbolicLink()) {
        const target = readlinkSync(this.hostPath(next));
        const resolved = target.startsWith("/") ? target : path.posix.join(cur, target);
        const rest = parts.slice(i + 1);
        return this.resolveDir([...path.posix.normalize(resolved).split("/").filter(Boolean), ...rest], depth + 1);
      }
      cur = next;
    }
    return cur;
  }

  exists(guestPath: string): boolean {
    try {
      lstatSync(this.hostPath(this.resolveParent(guestPath)));
      return true;
    } catch {
      return false;
    }
  }

  mkdirp(guestPath: string): void {
    const resolved = this.resolveDir(path.posix.normalize(guestPath).split("/").filter(Boolean));
    mkdirSync(this.hostPath(resolved), { recursive: true });
  }

  writeFile(guestPath: string, data: Buffer | string, mode: number): void {
    const resolved = this.resolveParent(guestPath);
    mkdirSync(path.dirname(this.hostPath(resolved)), { recursive: true });
    writeFileSync(this.hostPath(resolved), data);
    chmodSync(this.hostPath(resolved), mode);
  }

  symlink(guestPath: string, target: string): void {
    const resolved = this.resolveParent(guestPath);
    mkdirSync(path.dirname(this.hostPath(resolved)), { recursive: true });
    try {
      symlinkSync(target, this.hostPath(resolved));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
    }
  }

  /**
   * Copies a host path into the same place in the staging tree, recreating
   * every symlink met on the way (merged-/usr links, the absolute
   * ld-linux link, libfoo.so.6 -> libfoo.so.6.0.30) and then the real file
   * or directory. The guest's dynamic loader then finds everything at the
   * paths the host binary expects.
   */
  mirrorHost(hostPath: string, depth = 0): void {
    if (depth > 40) throw new Error(`staging: too many symlinks mirroring ${hostPath}`);
    const parts = path.posix.normalize(hostPath).split("/").filter(Boolean);
    let cur = "/";
    for (let i = 0; i < parts.length; i++) {
      const next = path.posix.join(cur, parts[i] ?? "");
      const st = lstatSync(next);
      const dest = this.hostPath(next);
      if (st.isSymbolicLink()) {
        const target = readlinkSync(next);
        if (!existsLstat(dest)) {
          mkdirSync(path.dirname(dest), { recursive: true });
          symlinkSync(target, dest);
        }
        const resolved = target.startsWith("/") ? target : path.posix.join(cur, target);
        this.mirrorHost(path.posix.join(resolved, ...parts.slice(i + 1)), depth + 1);
        return;
      }
      if (st.isDirectory()) {
        mkdirSync(dest, { recursive: true });
      } else if (i === parts.length - 1) {
        if (!existsLstat(dest)) copyFileSync(next, dest);
        chmodSync(dest, st.mode & 0o7777);
      } else {
        throw new Error(`staging: ${next} is not a directory`);
      }
      cur = next;
    }
  }
}

function existsLstat(p: string): boolean {
  try {
    lstatSync(p);
    return true;
  } catch {
    return false;
  }
}
