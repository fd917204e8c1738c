/**
 * Builds (once, then caches) everything a real lab guest needs:
 *
 * - the Debian kernel, resolved through the `linux-image-amd64` meta package
 *   (kernel.ts);
 * - a gzip cpio initramfs with busybox and the virtio/squashfs modules
 *   (cpio.ts, kernel-modules.ts);
 * - a read-only squashfs root with busybox, node, the agent bundle and the
 *   workload script (rootfs.ts);
 * - a data disk for page-cache workloads: an uncompressed squashfs holding
 *   one 500 MiB file of random bytes (`/blob`), which the guest mounts
 *   read-only at `/data` (so `/data/blob`).
 *
 * Images are cached by a hash of all their inputs (image-cache.ts). The host
 * packages come from preflight.ts, which this builder calls first.
 *
 * Why a squashfs root: node then pages in as reclaimable page cache, which
 * is what a production guest looks like; copying node into a tmpfs or the
 * initramfs would add ~105 MiB of unreclaimable Shmem and distort every
 * balloon number.
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
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { FailedPreconditionError, InvalidArgumentError } from "../shared/errors.js";
import { silentLogger, type Logger } from "../shared/logger.js";
import { MiB } from "../shared/units.js";
import { CpioWriter } from "./cpio.js";
import { run, runSync } from "./host-exec.js";
import {
  collectInputs,
  IMAGE_INITRD,
  IMAGE_ROOTFS,
  isValidStamp,
  pruneDataDisks,
  pruneImages,
  sha256,
  touchStamp,
  writeStamp,
  type BuildInputs,
} from "./image-cache.js";
import { ensureKernel, resolveKernelVersion } from "./kernel.js";
import { ensureHostPackages } from "./preflight.js";
import { busyboxApplets, GUEST_DATA_MOUNT, populateRoot, requireGuestFile } from "./rootfs.js";

export { findCommand } from "./host-exec.js";
export { readModinfo } from "./elf.js";
export { GUEST_AGENT_PATH, GUEST_DATA_MOUNT, GUEST_WORKLOAD_PATH } from "./rootfs.js";

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
/** The random file on the data disk, as the guest sees it; `workload.mjs cache-read` reads it by default. */
export const GUEST_DATA_BLOB = `${GUEST_DATA_MOUNT}/blob`;

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

/**
 * Makes sure a guest image for the given agent bundle exists in the cache and
 * returns its paths. Runs the host preflight (installing missing packages as
 * root), downloads the current Debian kernel when needed, and rebuilds the
 * initramfs and root only when an input (kernel version, agent bundle,
 * workload script, init scripts, node binary, busybox) changed.
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
  await ensureHostPackages({ onProgress: progress, logger: options.logger });

  mkdirSync(cacheDir, { recursive: true });
  const kernelVersion = await resolveKernelVersion(cacheDir, progress, log);
  const kernelRoot = await ensureKernel(cacheDir, kernelVersion, progress);
  const kernel = path.join(kernelRoot, "boot", `vmlinuz-${kernelVersion}`);
  if (!existsSync(kernel)) throw new FailedPreconditionError(`ensureGuestImage: ${kernel} missing from the extracted kernel package`);

  const inputs = collectInputs({ kernelRoot, kernelVersion, agentBundle, modules: GUEST_MODULES, builderVersion: BUILDER_VERSION });
  const imageDir = path.join(cacheDir, "images", inputs.hash.slice(0, 16));
  if (!isValidStamp(imageDir, inputs.hash)) {
    await buildImage(imageDir, inputs, progress, log);
  } else {
    progress(`guest image ${inputs.hash.slice(0, 16)} is cached`);
    touchStamp(imageDir);
  }
  pruneImages(path.join(cacheDir, "images"), imageDir, log);

  const dataDisk = await ensureDataDisk(cacheDir, progress, log);

  progress("guest image ready");
  return {
    kernel,
    initrd: path.join(imageDir, IMAGE_INITRD),
    rootfs: path.join(imageDir, IMAGE_ROOTFS),
    dataDisk,
    kernelVersion,
  };
}

// --------------------------------------------------------------------------
// Build

async function buildImage(imageDir: string, inputs: BuildInputs, progress: (s: string) => void, log: Logger): Promise<void> {
  const tmp = `${imageDir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  try {
    progress("building initramfs");
    writeFileSync(path.join(tmp, IMAGE_INITRD), buildInitramfs(inputs));

    progress("building root squashfs");
    const staging = path.join(tmp, "root");
    populateRoot(staging, inputs);
    await run("mksquashfs", [staging, path.join(tmp, IMAGE_ROOTFS), "-noappend", "-all-root", "-no-xattrs", "-comp", "gzip", "-quiet", "-no-progress"]);
    rmSync(staging, { recursive: true, force: true });

    const sizes = {
      initramfsBytes: statSync(path.join(tmp, IMAGE_INITRD)).size,
      rootfsBytes: statSync(path.join(tmp, IMAGE_ROOTFS)).size,
    };
    writeStamp(tmp, inputs, sizes);
    log.info({ dir: imageDir, ...sizes }, "built guest image");
    rmSync(imageDir, { recursive: true, force: true });
    try {
      renameSync(tmp, imageDir);
    } catch (err) {
      if (!isValidStamp(imageDir, inputs.hash)) throw err;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** The initramfs: busybox, the modules in load order (listed in /etc/modules) and /init. */
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
  cpio.file("init", requireGuestFile(inputs.guestFiles, "initramfs-init.sh"), 0o755);
  return gzipSync(cpio.finish(), { level: 6 });
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
  const listing = runSync("unsquashfs", ["-lls", "-d", "", image]);
  for (const line of listing.split("\n")) {
    // -r--r--r-- root/root         524288000 2026-11-25 13:58 /blob
    const m = /^\S+\s+\S+\s+(\d+)\s+\S+\s+\S+\s+(\S+)$/.exec(line.trim());
    if (m && m[2] === `/${DATA_DISK_RECIPE.file}`) return Number(m[1]);
  }
  return -1;
}
