/**
 * The guest kernel: Debian's current kernel, resolved through the
 * `linux-image-amd64` meta package (the ABI is never pinned, because old ABIs
 * vanish from the mirror after security updates), fetched with
 * `apt-get download` and unpacked with `dpkg -x` into
 * `<cacheDir>/kernels/<version>/`. Needs no root unless the package lists
 * must be refreshed.
 */
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { FailedPreconditionError } from "../shared/errors.js";
import type { Logger } from "../shared/logger.js";
import { isRoot, run } from "./host-exec.js";
import { aptEnv, updatePackageLists } from "./preflight.js";

/**
 * The kernel version (`uname -r`, e.g. "6.1.0-57-amd64") that
 * `linux-image-amd64` depends on now. Refreshes the package lists as root
 * when apt has no candidate; offline or without root, falls back to the
 * newest kernel in the cache.
 */
export async function resolveKernelVersion(cacheDir: string, progress: (s: string) => void, log: Logger): Promise<string> {
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
    await updatePackageLists(progress, "no candidate for linux-image-amd64");
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

/** Versions of the completely extracted kernels in the cache, oldest first. */
export function listCachedKernels(cacheDir: string): string[] {
  const dir = path.join(cacheDir, "kernels");
  if (!existsSync(dir)) return [];
  return readdirSync(dir)
    .filter((v) => existsSync(path.join(dir, v, ".complete")))
    .sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
}

/**
 * Makes sure `linux-image-<version>` is extracted in the cache and returns
 * the extraction root (holding `boot/vmlinuz-<version>` and the modules).
 * Safe against a concurrent process extracting the same kernel.
 */
export async function ensureKernel(cacheDir: string, version: string, progress: (s: string) => void): Promise<string> {
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
      await updatePackageLists(progress, "kernel download failed");
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
