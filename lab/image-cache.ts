/**
 * The guest image cache: every input of an image (builder version, kernel
 * version, module files, agent bundle, node and its libraries, busybox, the
 * guest files) is hashed into one key that names the image's folder
 * `<cacheDir>/images/<key>/`; a `stamp.json` there marks a complete build.
 * Old images and data disks are pruned, but only once unused for a while,
 * because another test process may be using them.
 */
import { createHash } from "node:crypto";
import { existsSync, readFileSync, readdirSync, realpathSync, rmSync, statSync, utimesSync, writeFileSync } from "node:fs";
import path from "node:path";
import type { Logger } from "../shared/logger.js";
import { findCommand } from "./host-exec.js";
import { findModulesDir, resolveModules, type ModuleInfo } from "./kernel-modules.js";
import { loadGuestFiles, sharedLibraries, type RootInputs } from "./rootfs.js";

/** The files of a complete image folder, besides `stamp.json`. */
export const IMAGE_INITRD = "initramfs.cpio.gz";
/** See {@link IMAGE_INITRD}. */
export const IMAGE_ROOTFS = "root.squashfs";
const STAMP = "stamp.json";

/** Everything an image is built from, and the hash of it all. */
export interface BuildInputs extends RootInputs {
  hash: string;
  kernelVersion: string;
  /** Modules in load order, dependencies first. */
  modules: ModuleInfo[];
  /** What was hashed: written into stamp.json for people comparing images. */
  summary: Record<string, unknown>;
}

/** Hex SHA-256. */
export function sha256(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex");
}

function sha256File(file: string): string {
  return sha256(readFileSync(file));
}

/**
 * Gathers and hashes the inputs of an image: resolves `modules` and their
 * dependencies in the extracted kernel, finds node's libraries and busybox,
 * and reads the guest files.
 */
export function collectInputs(o: {
  kernelRoot: string;
  kernelVersion: string;
  agentBundle: string;
  /** The modules the guest needs, by name; dependencies are added. */
  modules: readonly string[];
  /** Bumped when the recipe changes in a way the hashed inputs do not show. */
  builderVersion: number;
}): BuildInputs {
  const { kernelVersion, agentBundle } = o;
  const modulesDir = findModulesDir(o.kernelRoot, kernelVersion);
  const modules = resolveModules(modulesDir, o.modules);
  const nodeBinary = realpathSync(process.execPath);
  const busybox = realpathSync(findCommand("busybox") ?? "/bin/busybox");
  const libs = sharedLibraries(nodeBinary);
  const guestFiles = loadGuestFiles();

  // Key order matters: the hash is taken over this object's JSON.
  const summary = {
    builder: o.builderVersion,
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

/** The stamp file of an image folder. */
export function stampPath(imageDir: string): string {
  return path.join(imageDir, STAMP);
}

/** True if `imageDir` holds a complete image built from inputs with this hash. */
export function isValidStamp(imageDir: string, hash: string): boolean {
  try {
    const stamp = JSON.parse(readFileSync(stampPath(imageDir), "utf8")) as { hash?: string };
    return stamp.hash === hash && existsSync(path.join(imageDir, IMAGE_INITRD)) && existsSync(path.join(imageDir, IMAGE_ROOTFS));
  } catch {
    return false;
  }
}

/** Touches the stamp so pruning keeps recently used images. */
export function touchStamp(imageDir: string): void {
  const now = new Date();
  utimesSync(stampPath(imageDir), now, now);
}

/** Writes the stamp that marks `dir` as a complete image for `inputs`. */
export function writeStamp(dir: string, inputs: BuildInputs, sizes: { initramfsBytes: number; rootfsBytes: number }): void {
  writeFileSync(
    stampPath(dir),
    `${JSON.stringify({ hash: inputs.hash, builtAt: new Date().toISOString(), ...sizes, inputs: inputs.summary }, null, 2)}\n`,
  );
}

/**
 * Keeps a handful of images (other test files may use other agent bundles),
 * newest stamp first, plus `keep`; removes the half-built `.tmp-<pid>`
 * folders of processes that died mid-build.
 */
export function pruneImages(imagesDir: string, keep: string, log: Logger): void {
  const KEEP = 6;
  try {
    for (const d of readdirSync(imagesDir)) {
      const m = /\.tmp-(\d+)$/.exec(d);
      if (m && !pidAlive(Number(m[1]))) rmSync(path.join(imagesDir, d), { recursive: true, force: true });
    }
    const dirs = readdirSync(imagesDir)
      .map((d) => path.join(imagesDir, d))
      .filter((d) => d !== keep && !d.includes(".tmp-") && existsSync(stampPath(d)))
      .map((d) => ({ d, t: statSync(stampPath(d)).mtimeMs }))
      .sort((a, b) => b.t - a.t);
    for (const { d } of dirs.slice(KEEP - 1)) {
      log.info({ dir: d }, "pruning old guest image");
      rmSync(d, { recursive: true, force: true });
    }
  } catch (err) {
    log.warn({ err }, "could not prune old guest images");
  }
}

/**
 * Removes data disks other than `keep` (and the raw `data.img` of older
 * builders) once unused for an hour, and the leftovers of dead builders.
 * Another test process may have a disk of another recipe open in QEMU right
 * now; unlinking is safe for QEMU, but one that is about to start would fail,
 * so only disks unused for a while go.
 */
export function pruneDataDisks(cacheDir: string, keep: string, log: Logger): void {
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

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}
