/**
 * Builds (once, then caches) everything a real lab guest needs:
 *
 * - the Debian kernel, resolved through the `linux-image-amd64` meta package;
 * - a gzip cpio initramfs with busybox and the virtio/squashfs modules;
 * - a read-only squashfs root with busybox, node, the agent bundle and the
 *   workload script;
 * - a data disk for page-cache workloads: an uncompressed squashfs holding
 *   one 500 MiB file of random bytes (`/blob`), which the guest mounts
 *   read-only at `/data` (so `/data/blob`).
 *
 * Why a squashfs root: node then pages in as reclaimable page cache, which
 * is what a production guest looks like; copying node into a tmpfs or the
 * initramfs would add ~105 MiB of unreclaimable Shmem and distort every
 * balloon number (see /work/shared/rig-notes.md).
 *
 * Why a filesystem on the data disk rather than raw bytes read from
 * /dev/vdb: a file's pages are counted as `Cached` in /proc/meminfo, like
 * the clean page cache of a production guest, and they stay cached after the
 * reader exits because the mount keeps the device open. A raw block device's
 * cache is counted as `Buffers` instead and is dropped on its last close.
 * The squashfs is uncompressed so every cached page holds incompressible
 * random bytes, and it builds in about a second (mksquashfs streams the blob
 * from /dev/urandom; no staging copy).
 */
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  chmodSync,
  closeSync,
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  readdirSync,
  readlinkSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { homedir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { FailedPreconditionError, InvalidArgumentError } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { MiB } from "../shared/units.js";

/** Options for {@link ensureGuestImage}. */
export interface GuestImageOptions {
  /** Where kernels, images and the data disk are cached. Default `~/.cache/ballast`. */
  cacheDir?: string;
  /** A single-file ESM node program, normally `dist/ballast-agent.mjs`; installed as `/opt/ballast/ballast-agent.mjs`. */
  agentBundle: string;
  /** Called with a short human-readable step, e.g. "downloading kernel 6.1.0-56-amd64". */
  onProgress?: (step: string) => void;
  logger?: Logger;
}

/** Paths of a ready guest image. All files are read-only inputs for QEMU. */
export interface GuestImage {
  /** bzImage for `-kernel`. */
  kernel: string;
  /** gzip cpio for `-initrd`. */
  initrd: string;
  /** squashfs root, attached as the first virtio-blk disk (/dev/vda). */
  rootfs: string;
  /**
   * Uncompressed squashfs with one file, `/blob`, of {@link DATA_DISK_BYTES}
   * random bytes. Attached read-only as /dev/vdb; the guest's rc.sysinit
   * mounts it at /data, so workloads read {@link GUEST_DATA_BLOB}.
   */
  dataDisk: string;
  /** The guest's `uname -r`, e.g. "6.1.0-56-amd64". */
  kernelVersion: string;
}

/** Size of the random file (`/blob`) on the cached data disk. */
export const DATA_DISK_BYTES = 500 * MiB;
/** Where the data disk is mounted in the guest (by rc.sysinit). */
export const GUEST_DATA_MOUNT = "/data";
/** The random file on the data disk, as the guest sees it; `workload.mjs cache-read` reads it by default. */
export const GUEST_DATA_BLOB = "/data/blob";

/** Guest paths of the programs installed in the root image. */
export const GUEST_AGENT_PATH = "/opt/ballast/ballast-agent.mjs";
/** See {@link GUEST_AGENT_PATH}. */
export const GUEST_WORKLOAD_PATH = "/opt/ballast/workload.mjs";

// Bump when the build recipe changes in a way the hashed inputs do not show.
// 2: /data mount point in the root for the squashfs data disk.
const BUILDER_VERSION = 2;

// The data disk recipe: its hash names the cached file, so any change here
// (or a bump of DATA_DISK_VERSION for changes these values do not show)
// builds a new disk instead of reusing a stale one.
const DATA_DISK_VERSION = 1;
const DATA_DISK_RECIPE = {
  version: DATA_DISK_VERSION,
  format: "squashfs",
  file: "blob",
  bytes: DATA_DISK_BYTES,
  source: "/dev/urandom",
  // Uncompressed everything: cached pages must hold incompressible random
  // bytes, and no compression keeps the build at about a second.
  mksquashfs: ["-noappend", "-all-root", "-no-xattrs", "-noI", "-noD", "-noF", "-noX", "-no-fragments", "-no-duplicates", "-quiet", "-no-progress"],
} as const;

// Modules the guest needs, by module name; their dependencies are added from
// each .ko's depends= field. failover/net_failover come in via virtio_net.
const GUEST_MODULES = [
  "virtio_pci",
  "virtio_balloon",
  "virtio_blk",
  "virtio_net",
  "virtio_console",
  "failover",
  "net_failover",
  "squashfs",
];

// Host tools and the Debian packages that provide them.
const REQUIRED_TOOLS: ReadonlyArray<{ command: string; pkg: string; staticElf?: boolean }> = [
  { command: "qemu-system-x86_64", pkg: "qemu-system-x86" },
  // The same binary goes into the initramfs and the guest root, so it must not need host libraries.
  { command: "busybox", pkg: "busybox-static", staticElf: true },
  { command: "cpio", pkg: "cpio" },
  { command: "socat", pkg: "socat" },
  { command: "mksquashfs", pkg: "squashfs-tools" },
  // Checks the data disk after building it.
  { command: "unsquashfs", pkg: "squashfs-tools" },
];
const APT_PACKAGES = [...new Set(REQUIRED_TOOLS.map((t) => t.pkg))];
const APT_TOOLS = ["apt-get", "apt-cache", "dpkg", "ldd"];

const GUEST_DIR = fileURLToPath(new URL("./guest/", import.meta.url));

// --------------------------------------------------------------------------
// Public entry point

/**
 * Makes sure a guest image for the given agent bundle exists in the cache and
 * returns its paths. Installs missing host packages (as root, via apt),
 * downloads the current Debian kernel when needed, and rebuilds the initramfs
 * and root only when an input (kernel version, agent bundle, workload script,
 * init scripts, node binary, busybox) changed.
 */
export async function ensureGuestImage(options: GuestImageOptions): Promise<GuestImage> {
  const log = (options.logger ?? silentLogger()).child({ component: "guest-image" });
  const progress = (step: string) => {
    log.info({ step }, step);
    options.onProgress?.(step);
  };
  const cacheDir = path.resolve(options.cacheDir ?? path.join(homedir(), ".cache", "ballast"));
  const agentBundle = path.resolve(options.agentBundle);
  if (!existsSync(agentBundle) || !statSync(agentBundle).isFile()) {
    throw new InvalidArgumentError(`ensureGuestImage: agent bundle ${agentBundle} does not exist (build it with "npm run build")`);
  }

  progress("checking host tools");
  await ensureHostTools(progress, log);

  mkdirSync(cacheDir, { recursive: true });
  const kernelVersion = await resolveKernelVersion(cacheDir, progress, log);
  const kernelRoot = await ensureKernel(cacheDir, kernelVersion, progress);
  const kernel = path.join(kernelRoot, "boot", `vmlinuz-${kernelVersion}`);
  if (!existsSync(kernel)) throw new FailedPreconditionError(`ensureGuestImage: ${kernel} missing from the extracted kernel package`);

  const inputs = collectInputs(kernelRoot, kernelVersion, agentBundle);
  const imageDir = path.join(cacheDir, "images", inputs.hash.slice(0, 16));
  const stampPath = path.join(imageDir, "stamp.json");
  if (!isValidStamp(stampPath, inputs.hash)) {
    await buildImage(imageDir, inputs, progress, log);
  } else {
    progress(`guest image ${inputs.hash.slice(0, 16)} is cached`);
    // Touch the stamp so pruning keeps recently used images.
    const now = new Date();
    utimesSync(stampPath, now, now);
  }
  pruneImages(path.join(cacheDir, "images"), imageDir, log);

  const dataDisk = await ensureDataDisk(cacheDir, progress, log);

  progress("guest image ready");
  return {
    kernel,
    initrd: path.join(imageDir, "initramfs.cpio.gz"),
    rootfs: path.join(imageDir, "root.squashfs"),
    dataDisk,
    kernelVersion,
  };
}

// --------------------------------------------------------------------------
// Host tools and apt

/** Finds an executable in PATH plus the sbin directories a root shell would have. */
export function findCommand(command: string): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(":"), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];
  for (const dir of dirs) {
    if (!dir) continue;
    const candidate = path.join(dir, command);
    try {
      const st = statSync(candidate);
      if (st.isFile() && (st.mode & 0o111) !== 0) return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

function isRoot(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

async function ensureHostTools(progress: (s: string) => void, log: Logger): Promise<void> {
  const missingApt = APT_TOOLS.filter((c) => !findCommand(c));
  if (missingApt.length > 0) {
    throw new FailedPreconditionError(
      `ensureGuestImage: this lab needs a Debian-family host with apt; missing commands: ${missingApt.join(", ")}`,
    );
  }
  const missing = missingTools();
  if (missing.length === 0) return;

  const pkgs = [...new Set(missing.map((m) => m.pkg))];
  const what = missing.map((m) => `${m.command}${m.reason ? ` (${m.reason})` : ""} from package ${m.pkg}`).join(", ");
  if (!isRoot()) {
    throw new FailedPreconditionError(
      `ensureGuestImage: missing ${what}; installing needs root but this process runs as uid ${process.getuid?.()}. ` +
        `Run as root, or install them first: apt-get install -y --no-install-recommends ${pkgs.join(" ")}`,
    );
  }
  progress("apt-get update");
  await run("apt-get", ["update"], { env: aptEnv() });
  progress(`installing packages: ${APT_PACKAGES.join(" ")}`);
  await run("apt-get", ["install", "-y", "--no-install-recommends", ...APT_PACKAGES], { env: aptEnv() });
  const still = missingTools();
  if (still.length > 0) {
    throw new FailedPreconditionError(
      `ensureGuestImage: still missing after apt-get install: ${still.map((m) => `${m.command} (${m.pkg})`).join(", ")}`,
    );
  }
  log.info({ pkgs }, "installed host packages");
}

function missingTools(): Array<{ command: string; pkg: string; reason?: string }> {
  const out: Array<{ command: string; pkg: string; reason?: string }> = [];
  for (const tool of REQUIRED_TOOLS) {
    const found = findCommand(tool.command);
    if (!found) out.push({ command: tool.command, pkg: tool.pkg });
    else if (tool.staticElf && !isStaticElf(found)) out.push({ command: tool.command, pkg: tool.pkg, reason: "found but dynamically linked" });
  }
  return out;
}

function aptEnv(): NodeJS.ProcessEnv {
  return { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
}

// --------------------------------------------------------------------------
// Kernel

async function resolveKernelVersion(cacheDir: string, progress: (s: string) => void, log: Logger): Promise<string> {
  progress("resolving kernel via linux-image-amd64");
  const fromApt = async (): Promise<string | undefined> => {
    try {
      const { stdout } = await run("apt-cache", ["depends", "linux-image-amd64"]);
      const m = /Depends:\s*linux-image-(\d[^\s:]*)/.exec(stdout);
      return m?.[1];
    } catch {
      return undefined;
    }
  };
  let version = await fromApt();
  if (!version && isRoot()) {
    progress("apt-get update (no candidate for linux-image-amd64)");
    await run("apt-get", ["update"], { env: aptEnv() });
    version = await fromApt();
  }
  if (version) return version;
  // Offline or unprivileged with stale lists: fall back to a kernel we already have.
  const cached = listCachedKernels(cacheDir);
  const newest = cached.at(-1);
  if (newest) {
    log.warn({ version: newest }, "apt could not resolve linux-image-amd64; using the newest cached kernel");
    return newest;
  }
  throw new FailedPreconditionError(
    "ensureGuestImage: apt has no candidate for linux-image-amd64 and no kernel is cached" +
      (isRoot() ? " (apt-get update did not help)" : "; run apt-get update as root"),
  );
}

function listCachedKernels(cacheDir: string): string[] {
  const dir = path.join(cacheDir, "kernels");
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((v) => existsSync(path.join(dir, v, ".complete")))
    .sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
}

async function ensureKernel(cacheDir: string, version: string, progress: (s: string) => void): Promise<string> {
  const root = path.join(cacheDir, "kernels", version);
  if (existsSync(path.join(root, ".complete"))) return root;

  const debs = path.join(cacheDir, "debs");
  mkdirSync(debs, { recursive: true });
  const pkg = `linux-image-${version}`;
  const findDeb = () => readdirSync(debs).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
  if (!findDeb()) {
    progress(`downloading kernel ${version}`);
    try {
      await run("apt-get", ["download", pkg], { cwd: debs, env: aptEnv() });
    } catch (err) {
      // Old ABIs vanish from the mirror after security updates; fresh lists may name a new one.
      if (!isRoot()) throw err;
      progress("apt-get update (kernel download failed)");
      await run("apt-get", ["update"], { env: aptEnv() });
      await run("apt-get", ["download", pkg], { cwd: debs, env: aptEnv() });
    }
  }
  const deb = findDeb();
  if (!deb) throw new FailedPreconditionError(`ensureGuestImage: apt-get download ${pkg} left no .deb in ${debs}`);

  progress(`extracting kernel ${version}`);
  const tmp = `${root}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  await run("dpkg", ["-x", path.join(debs, deb), tmp]);
  writeFileSync(path.join(tmp, ".complete"), `${deb}\n`);
  try {
    renameSync(tmp, root);
  } catch (err) {
    // Another process finished the same extraction first; use theirs.
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(path.join(root, ".complete"))) throw err;
  }
  rmSync(path.join(debs, deb), { force: true });
  return root;
}

// --------------------------------------------------------------------------
// Kernel modules

interface ModuleInfo {
  name: string;
  file: string;
  depends: string[];
}

function normalizeModName(name: string): string {
  return name.replace(/-/g, "_");
}

function findModulesDir(kernelRoot: string, version: string): string {
  for (const base of ["lib/modules", "usr/lib/modules"]) {
    const dir = path.join(kernelRoot, base, version);
    if (existsSync(dir)) return dir;
  }
  throw new FailedPreconditionError(`ensureGuestImage: no lib/modules/${version} in the extracted kernel at ${kernelRoot}`);
}

function indexModules(modulesDir: string): { files: Map<string, string>; compressed: Set<string>; builtin: Set<string> } {
  const files = new Map<string, string>();
  const compressed = new Set<string>();
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.name.endsWith(".ko")) files.set(normalizeModName(entry.name.slice(0, -3)), full);
      else if (/\.ko\.(xz|zst|gz)$/.test(entry.name)) compressed.add(normalizeModName(entry.name.replace(/\.ko\..*$/, "")));
    }
  };
  walk(path.join(modulesDir, "kernel"));
  const builtin = new Set<string>();
  const builtinList = path.join(modulesDir, "modules.builtin");
  if (existsSync(builtinList)) {
    for (const line of readFileSync(builtinList, "utf8").split("\n")) {
      const base = path.basename(line.trim());
      if (base.endsWith(".ko")) builtin.add(normalizeModName(base.slice(0, -3)));
    }
  }
  return { files, compressed, builtin };
}

/**
 * Reads the `.modinfo` section of an ELF64 little-endian kernel module and
 * returns its key=value pairs (keys can repeat, e.g. alias). Done in-process
 * so the host needs no kmod/modinfo.
 */
export function readModinfo(ko: Buffer): Map<string, string[]> {
  if (ko.readUInt32BE(0) !== 0x7f454c46 || ko[4] !== 2 || ko[5] !== 1) throw new Error("not an ELF64 little-endian file");
  const shoff = Number(ko.readBigUInt64LE(0x28));
  const shentsize = ko.readUInt16LE(0x3a);
  const shnum = ko.readUInt16LE(0x3c);
  const shstrndx = ko.readUInt16LE(0x3e);
  const section = (i: number) => {
    const base = shoff + i * shentsize;
    return { name: ko.readUInt32LE(base), offset: Number(ko.readBigUInt64LE(base + 24)), size: Number(ko.readBigUInt64LE(base + 32)) };
  };
  const strtab = section(shstrndx);
  const nameAt = (off: number) => {
    const start = strtab.offset + off;
    return ko.toString("latin1", start, ko.indexOf(0, start));
  };
  const out = new Map<string, string[]>();
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    if (nameAt(s.name) !== ".modinfo") continue;
    for (const entry of ko.toString("latin1", s.offset, s.offset + s.size).split("\0")) {
      const eq = entry.indexOf("=");
      if (eq <= 0) continue;
      const key = entry.slice(0, eq);
      const list = out.get(key) ?? [];
      list.push(entry.slice(eq + 1));
      out.set(key, list);
    }
    return out;
  }
  throw new Error("no .modinfo section");
}

/** Resolves the wanted modules plus their dependencies, dependencies first. */
function resolveModules(modulesDir: string, wanted: readonly string[]): ModuleInfo[] {
  const { files, compressed, builtin } = indexModules(modulesDir);
  const order: ModuleInfo[] = [];
  const state = new Map<string, "visiting" | "done">();
  const visit = (raw: string, chain: string[]) => {
    const name = normalizeModName(raw);
    if (state.get(name) === "done") return;
    if (state.get(name) === "visiting") throw new FailedPreconditionError(`ensureGuestImage: module dependency cycle: ${[...chain, name].join(" -> ")}`);
    const file = files.get(name);
    if (!file) {
      if (builtin.has(name)) {
        state.set(name, "done");
        return;
      }
      if (compressed.has(name)) {
        throw new FailedPreconditionError(`ensureGuestImage: module ${name} is only available compressed; this builder loads plain .ko files with busybox insmod`);
      }
      throw new FailedPreconditionError(`ensureGuestImage: kernel module ${name} (needed by ${chain.join(" -> ") || "the guest"}) not found in ${modulesDir}`);
    }
    state.set(name, "visiting");
    const info = readModinfo(readFileSync(file));
    const depends = (info.get("depends")?.[0] ?? "").split(",").filter(Boolean);
    for (const dep of depends) visit(dep, [...chain, name]);
    state.set(name, "done");
    order.push({ name, file, depends });
  };
  for (const m of wanted) visit(m, []);
  return order;
}

// --------------------------------------------------------------------------
// Inputs and hashing

interface BuildInputs {
  hash: string;
  kernelVersion: string;
  modules: ModuleInfo[];
  agentBundle: string;
  nodeBinary: string;
  busybox: string;
  libs: string[];
  guestFiles: Record<string, string>;
  summary: Record<string, unknown>;
}

function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

function sha256File(file: string): string {
  return sha256(readFileSync(file));
}

function collectInputs(kernelRoot: string, kernelVersion: string, agentBundle: string): BuildInputs {
  const modulesDir = findModulesDir(kernelRoot, kernelVersion);
  const modules = resolveModules(modulesDir, GUEST_MODULES);
  const nodeBinary = realpathSync(process.execPath);
  const busybox = realpathSync(findCommand("busybox") ?? "/bin/busybox");
  const libs = sharedLibraries(nodeBinary);
  const guestFileNames = ["initramfs-init.sh", "rc-sysinit.sh", "agent-supervisor.sh", "inittab", "profile", "workload.mjs"];
  const guestFiles: Record<string, string> = {};
  for (const name of guestFileNames) guestFiles[name] = readFileSync(path.join(GUEST_DIR, name), "utf8");

  const summary = {
    builder: BUILDER_VERSION,
    kernelVersion,
    modules: modules.map((m) => `${m.name}:${sha256File(m.file).slice(0, 16)}`),
    agent: sha256File(agentBundle),
    node: { path: process.execPath, sha256: sha256File(nodeBinary) },
    busybox: sha256File(busybox),
    libs: libs.map((l) => `${l}:${sha256File(realpathSync(l)).slice(0, 16)}`),
    guestFiles: Object.fromEntries(Object.entries(guestFiles).map(([k, v]) => [k, sha256(v).slice(0, 16)])),
  };
  return {
    hash: sha256(JSON.stringify(summary)),
    kernelVersion,
    modules,
    agentBundle,
    nodeBinary,
    busybox,
    libs,
    guestFiles,
    summary,
  };
}

/** The absolute library paths (and the ELF interpreter) a dynamic binary loads, from ldd. */
function sharedLibraries(binary: string): string[] {
  const out = spawnSyncText("ldd", [binary]);
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

function isValidStamp(stampPath: string, hash: string): boolean {
  try {
    const stamp = JSON.parse(readFileSync(stampPath, "utf8")) as { hash?: string };
    const dir = path.dirname(stampPath);
    return stamp.hash === hash && existsSync(path.join(dir, "initramfs.cpio.gz")) && existsSync(path.join(dir, "root.squashfs"));
  } catch {
    return false;
  }
}

// Keep a handful of images: other test files may use other agent bundles.
function pruneImages(imagesDir: string, keep: string, log: Logger): void {
  const KEEP = 6;
  try {
    // Half-built images of processes that died mid-build.
    for (const d of readdirSync(imagesDir)) {
      const m = /\.tmp-(\d+)$/.exec(d);
      if (m && !pidAlive(Number(m[1]))) rmSync(path.join(imagesDir, d), { recursive: true, force: true });
    }
    const dirs = readdirSync(imagesDir)
      .map((d) => path.join(imagesDir, d))
      .filter((d) => d !== keep && !d.includes(".tmp-") && existsSync(path.join(d, "stamp.json")))
      .map((d) => ({ d, t: statSync(path.join(d, "stamp.json")).mtimeMs }))
      .sort((a, b) => b.t - a.t);
    for (const { d } of dirs.slice(KEEP - 1)) {
      log.info({ dir: d }, "pruning old guest image");
      rmSync(d, { recursive: true, force: true });
    }
  } catch (err) {
    log.warn({ err }, "could not prune old guest images");
  }
}

// --------------------------------------------------------------------------
// Build

async function buildImage(imageDir: string, inputs: BuildInputs, progress: (s: string) => void, log: Logger): Promise<void> {
  const tmp = `${imageDir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  try {
    progress("building initramfs");
    writeFileSync(path.join(tmp, "initramfs.cpio.gz"), buildInitramfs(inputs));

    progress("building root squashfs");
    const staging = path.join(tmp, "root");
    populateRoot(staging, inputs);
    await run("mksquashfs", [
      staging,
      path.join(tmp, "root.squashfs"),
      "-noappend",
      "-all-root",
      "-no-xattrs",
      "-comp",
      "gzip",
      "-quiet",
      "-no-progress",
    ]);
    rmSync(staging, { recursive: true, force: true });

    const sizes = {
      initramfsBytes: statSync(path.join(tmp, "initramfs.cpio.gz")).size,
      rootfsBytes: statSync(path.join(tmp, "root.squashfs")).size,
    };
    writeFileSync(
      path.join(tmp, "stamp.json"),
      `${JSON.stringify({ hash: inputs.hash, builtAt: new Date().toISOString(), ...sizes, inputs: inputs.summary }, null, 2)}\n`,
    );
    log.info({ dir: imageDir, ...sizes }, "built guest image");
    rmSync(imageDir, { recursive: true, force: true });
    try {
      renameSync(tmp, imageDir);
    } catch (err) {
      if (!isValidStamp(path.join(imageDir, "stamp.json"), inputs.hash)) throw err;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

function buildInitramfs(inputs: BuildInputs): Buffer {
  const cpio = new CpioWriter();
  for (const dir of ["bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys"]) cpio.dir(dir);
  // The kernel opens /dev/console before running /init; without the node
  // init would have no stdio. A cpio entry needs no root, unlike mknod.
  cpio.charDev("dev/console", 5, 1, 0o600);
  cpio.file("bin/busybox", readFileSync(inputs.busybox), 0o755);
  for (const applet of busyboxApplets(inputs.busybox)) {
    if (applet !== "busybox") cpio.symlink(`bin/${applet}`, "busybox");
  }
  for (const m of inputs.modules) cpio.file(`lib/modules/${m.name}.ko`, readFileSync(m.file), 0o644);
  cpio.file("etc/modules", inputs.modules.map((m) => `${m.name}.ko`).join("\n") + "\n", 0o644);
  cpio.file("init", requireGuestFile(inputs, "initramfs-init.sh"), 0o755);
  return gzipSync(cpio.finish(), { level: 6 });
}

function requireGuestFile(inputs: BuildInputs, name: string): string {
  const text = inputs.guestFiles[name];
  if (text === undefined) throw new Error(`guest file ${name} not loaded`);
  return text;
}

function busyboxApplets(busybox: string): string[] {
  return spawnSyncText(busybox, ["--list"])
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
}

function busyboxAppletPaths(busybox: string): string[] {
  return spawnSyncText(busybox, ["--list-full"])
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
}

function populateRoot(stagingDir: string, inputs: BuildInputs): void {
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

  root.writeFile("/etc/inittab", requireGuestFile(inputs, "inittab"), 0o644);
  root.writeFile("/etc/profile", requireGuestFile(inputs, "profile"), 0o644);
  root.writeFile("/etc/ballast/rc.sysinit", requireGuestFile(inputs, "rc-sysinit.sh"), 0o755);
  root.writeFile("/etc/ballast/agent-supervisor", requireGuestFile(inputs, "agent-supervisor.sh"), 0o755);
  root.writeFile("/etc/passwd", "root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644);
  root.writeFile("/etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644);
  root.writeFile("/etc/hosts", "127.0.0.1 localhost\n10.0.2.15 ballast-guest\n", 0o644);
  root.writeFile("/etc/hostname", "ballast-guest\n", 0o644);
  root.writeFile("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n", 0o644);

  root.writeFile(GUEST_AGENT_PATH, readFileSync(inputs.agentBundle), 0o755);
  root.writeFile(GUEST_WORKLOAD_PATH, requireGuestFile(inputs, "workload.mjs"), 0o755);
  root.writeFile("/usr/local/bin/ballast-agent", `#!/bin/sh\nexec node ${GUEST_AGENT_PATH} "$@"\n`, 0o755);
  root.writeFile("/usr/local/bin/workload", `#!/bin/sh\nexec node ${GUEST_WORKLOAD_PATH} "$@"\n`, 0o755);
}

/**
 * A directory being filled as a future root filesystem. Guest paths are
 * resolved inside it, following symlinks *within* the staging tree (absolute
 * targets are re-rooted), so writing never escapes onto the host through a
 * copied absolute link such as /lib64/ld-linux-x86-64.so.2.
 */
class Staging {
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

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
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

/**
 * A minimal writer for the "newc" cpio format the kernel unpacks as
 * initramfs. Writing it ourselves sets owner root and creates the
 * /dev/console node without needing root or mknod on the host.
 */
class CpioWriter {
  private readonly parts: Buffer[] = [];
  private ino = 1;

  dir(name: string, mode = 0o755): void {
    this.entry(name, 0o040000 | mode, Buffer.alloc(0), 2);
  }

  file(name: string, data: Buffer | string, mode: number): void {
    this.entry(name, 0o100000 | mode, typeof data === "string" ? Buffer.from(data) : data, 1);
  }

  symlink(name: string, target: string): void {
    this.entry(name, 0o120000 | 0o777, Buffer.from(target), 1);
  }

  charDev(name: string, major: number, minor: number, mode: number): void {
    this.entry(name, 0o020000 | mode, Buffer.alloc(0), 1, major, minor);
  }

  finish(): Buffer {
    this.entry("TRAILER!!!", 0, Buffer.alloc(0), 1, 0, 0, true);
    return Buffer.concat(this.parts);
  }

  private entry(name: string, mode: number, data: Buffer, nlink: number, rdevMajor = 0, rdevMinor = 0, trailer = false): void {
    const hex = (n: number) => n.toString(16).padStart(8, "0");
    const nameBuf = Buffer.from(`${name}\0`);
    const fields = [
      trailer ? 0 : this.ino++,
      mode,
      0, // uid
      0, // gid
      nlink,
      0, // mtime: fixed, so identical inputs give an identical archive
      data.length,
      0, // devmajor
      0, // devminor
      rdevMajor,
      rdevMinor,
      nameBuf.length,
      0, // check
    ];
    const header = Buffer.from(`070701${fields.map(hex).join("")}`, "latin1");
    this.parts.push(header, nameBuf, pad4(header.length + nameBuf.length), data, pad4(data.length));
  }
}

function pad4(len: number): Buffer {
  return Buffer.alloc((4 - (len % 4)) % 4);
}

// --------------------------------------------------------------------------
// Data disk

/**
 * Makes sure the data disk for the current {@link DATA_DISK_RECIPE} exists in
 * `cacheDir/data/` and returns its path. The file name carries the recipe's
 * hash, so a changed recipe builds a new disk; disks of other recipes (and
 * the raw `data.img` of older builders) are pruned once unused for a while.
 */
async function ensureDataDisk(cacheDir: string, progress: (s: string) => void, log: Logger): Promise<string> {
  const key = sha256(JSON.stringify(DATA_DISK_RECIPE)).slice(0, 16);
  const dir = path.join(cacheDir, "data");
  const file = path.join(dir, `data-${key}.squashfs`);
  mkdirSync(dir, { recursive: true });
  if (existsSync(file)) {
    const now = new Date();
    utimesSync(file, now, now);
  } else {
    progress(`creating data disk (squashfs, /blob of ${DATA_DISK_BYTES / MiB} MiB random bytes)`);
    const tmp = `${file}.tmp-${process.pid}`;
    const empty = path.join(dir, `.empty-${process.pid}`);
    rmSync(tmp, { force: true });
    rmSync(empty, { recursive: true, force: true });
    mkdirSync(empty);
    try {
      // A pseudo file: mksquashfs runs the command and stores its output as
      // /blob, so the 500 MiB never needs a staging copy on the host.
      // Random, so that every cached page is non-zero and incompressible:
      // QEMU sends zero pages almost for free, which would hide the cost of cache.
      const pseudo = `${DATA_DISK_RECIPE.file} f 444 0 0 head -c ${DATA_DISK_RECIPE.bytes} ${DATA_DISK_RECIPE.source}`;
      await run("mksquashfs", [empty, tmp, ...DATA_DISK_RECIPE.mksquashfs, "-p", pseudo]);
      const size = dataDiskBlobSize(tmp);
      if (size !== DATA_DISK_BYTES) {
        throw new FailedPreconditionError(`ensureGuestImage: data disk /${DATA_DISK_RECIPE.file} has ${size} bytes, expected ${DATA_DISK_BYTES}`);
      }
      renameSync(tmp, file);
    } finally {
      rmSync(tmp, { force: true });
      rmSync(empty, { recursive: true, force: true });
    }
    log.info({ file, bytes: statSync(file).size }, "built data disk");
  }
  pruneDataDisks(cacheDir, file, log);
  return file;
}

/** The size of /blob in a data disk image, from `unsquashfs -lls`; -1 when absent. */
function dataDiskBlobSize(image: string): number {
  const listing = spawnSyncText("unsquashfs", ["-lls", "-d", "", image]);
  for (const line of listing.split("\n")) {
    // -r--r--r-- root/root         524288000 2026-11-25 13:58 /blob
    const m = /^\S+\s+\S+\s+(\d+)\s+\S+\s+\S+\s+(\S+)$/.exec(line.trim());
    if (m && m[2] === `/${DATA_DISK_RECIPE.file}`) return Number(m[1]);
  }
  return -1;
}

// Another test process may have a disk of another recipe open in QEMU right
// now; unlinking is safe for QEMU, but one that is about to start would fail,
// so only disks unused for a while go.
function pruneDataDisks(cacheDir: string, keep: string, log: Logger): void {
  const STALE_MS = 60 * 60 * 1000;
  const candidates = [path.join(cacheDir, "data.img")];
  const dir = path.dirname(keep);
  try {
    for (const f of readdirSync(dir)) candidates.push(path.join(dir, f));
  } catch {
    // nothing to prune
  }
  for (const f of candidates) {
    if (f === keep) continue;
    const m = /\.(?:tmp|empty)-(\d+)$/.exec(f);
    try {
      if (m) {
        if (!pidAlive(Number(m[1]))) rmSync(f, { recursive: true, force: true });
        continue;
      }
      if (Date.now() - statSync(f).mtimeMs < STALE_MS) continue;
      log.info({ file: f }, "pruning old data disk");
      rmSync(f, { force: true });
    } catch {
      // already gone
    }
  }
}

// --------------------------------------------------------------------------
// Process helpers

/** True if the ELF file has no PT_INTERP program header (no dynamic loader needed). */
function isStaticElf(file: string): boolean {
  try {
    const fd = openSync(file, "r");
    try {
      const head = Buffer.alloc(64);
      readAt(fd, head, 0);
      if (head.readUInt32BE(0) !== 0x7f454c46 || head[4] !== 2) return false;
      const phoff = Number(head.readBigUInt64LE(0x20));
      const phentsize = head.readUInt16LE(0x36);
      const phnum = head.readUInt16LE(0x38);
      const ph = Buffer.alloc(phentsize * phnum);
      readAt(fd, ph, phoff);
      for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3) return false; // PT_INTERP
      return true;
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

function readAt(fd: number, buf: Buffer, position: number): void {
  // Small header reads; a short read means a truncated file, which then fails the ELF checks.
  readSync(fd, buf, 0, buf.length, position);
}

function spawnSyncText(command: string, args: string[]): string {
  const res = spawnSync(command, args, { encoding: "utf8", maxBuffer: 64 * MiB });
  if (res.error) throw new FailedPreconditionError(`ensureGuestImage: cannot run ${command}: ${res.error.message}`);
  if (res.status !== 0) throw new FailedPreconditionError(`ensureGuestImage: ${command} ${args.join(" ")} failed (${res.status}): ${tail(res.stderr)}`);
  return res.stdout;
}

function tail(text: string, max = 2000): string {
  const t = text.trim();
  return t.length > max ? `…${t.slice(-max)}` : t;
}

/** Runs a command to completion; rejects with its stderr tail on failure. */
function run(command: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
      if (stdout.length > 4 * MiB) stdout = stdout.slice(-MiB);
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
      if (stderr.length > 4 * MiB) stderr = stderr.slice(-MiB);
    });
    child.once("error", (err) => reject(new FailedPreconditionError(`ensureGuestImage: cannot run ${command}: ${err.message}`)));
    child.once("close", (code, signal) => {
      if (code === 0) resolve({ stdout, stderr });
      else reject(new FailedPreconditionError(`ensureGuestImage: ${command} ${args.join(" ")} failed (${signal ?? code}): ${tail(stderr || stdout)}`));
    });
  });
}
