/**
 * Kernel modules for the initramfs: an index of an extracted kernel's
 * `.ko` files, and the walk over each module's `depends=` field (read from
 * its `.modinfo` section) that yields the load order, dependencies first.
 * busybox `insmod` in the initramfs loads them in exactly this order.
 */
import { existsSync, readFileSync, readdirSync } from "node:fs";
import path from "node:path";
import { FailedPreconditionError } from "../shared/errors.js";
import { readModinfo } from "./elf.js";

/** One module to load. */
export interface ModuleInfo {
  /** Module name with `_` for `-`, e.g. "net_failover". */
  name: string;
  /** The plain `.ko` file. */
  file: string;
  /** Its `depends=` list, as written in the module. */
  depends: string[];
}

/** Module names use `-` and `_` interchangeably; the kernel treats them alike. */
export function normalizeModName(name: string): string {
  return name.replace(/-/g, "_");
}

/** `lib/modules/<version>` (or `usr/lib/modules/<version>`) inside an extracted kernel package. */
export function findModulesDir(kernelRoot: string, version: string): string {
  for (const base of ["lib/modules", "usr/lib/modules"]) {
    const dir = path.join(kernelRoot, base, version);
    if (existsSync(dir)) return dir;
  }
  throw new FailedPreconditionError(`ensureGuestImage: no lib/modules/${version} in the extracted kernel at ${kernelRoot}`);
}

/**
 * Indexes `<modulesDir>/kernel/**`: plain `.ko` files by module name, the
 * names only available compressed (`.ko.xz` / `.zst` / `.gz`), and the
 * built-in modules listed in `modules.builtin`.
 */
export function indexModules(modulesDir: string): { files: Map<string, string>; compressed: Set<string>; builtin: Set<string> } {
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
 * Resolves the wanted modules plus their dependencies, dependencies first,
 * each module once. Built-in modules are skipped; a module that is missing,
 * only compressed, or part of a dependency cycle is an error.
 */
export function resolveModules(modulesDir: string, wanted: readonly string[]): ModuleInfo[] {
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
