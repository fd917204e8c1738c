/**
 * lab/kernel-modules.ts: the module index and the depends= walk that gives
 * the initramfs its insmod order, on a tiny synthetic lib/modules tree.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { findModulesDir, indexModules, resolveModules, type ModuleInfo } from "../../lab/kernel-modules.js";
import { syntheticKo } from "./synthetic-elf.js";

const VERSION = "6.1.0-99-amd64";
let kernelRoot = "";
let modulesDir = "";

/** name -> [relative dir under kernel/, depends]. File names may use '-'. */
const MODULES: Record<string, [string, string]> = {
  virtio: ["drivers/virtio", ""],
  virtio_ring: ["drivers/virtio", ""],
  virtio_pci_legacy_dev: ["drivers/virtio", ""],
  virtio_pci: ["drivers/virtio", "virtio_pci_legacy_dev,virtio_ring,virtio"],
  virtio_net: ["drivers/net", "net_failover,virtio_ring,virtio"],
  "net-failover": ["drivers/net", "failover"],
  failover: ["net/core", ""],
  uses_builtin: ["fs", "crc32c_generic"],
  needs_missing: ["fs", "absent_mod"],
  needs_compressed: ["fs", "zmod"],
  cyc_a: ["misc", "cyc_b"],
  cyc_b: ["misc", "cyc_c"],
  cyc_c: ["misc", "cyc_a"],
};

beforeAll(() => {
  kernelRoot = mkdtempSync(path.join(tmpdir(), "ballast-kmod-"));
  modulesDir = path.join(kernelRoot, "lib/modules", VERSION);
  for (const [name, [dir, depends]] of Object.entries(MODULES)) {
    mkdirSync(path.join(modulesDir, "kernel", dir), { recursive: true });
    writeFileSync(path.join(modulesDir, "kernel", dir, `${name}.ko`), syntheticKo(["license=GPL", `depends=${depends}`, "intree=Y", `name=${name}`]));
  }
  writeFileSync(path.join(modulesDir, "kernel/fs/zmod.ko.xz"), "not really xz");
  writeFileSync(path.join(modulesDir, "modules.builtin"), "kernel/crypto/crc32c_generic.ko\nkernel/fs/ext4/ext4.ko\n");
});

afterAll(() => rmSync(kernelRoot, { recursive: true, force: true }));

const names = (mods: ModuleInfo[]) => mods.map((m) => m.name);

/** Every module comes after all of its dependencies that are in the list. */
function expectDependenciesFirst(mods: ModuleInfo[]): void {
  const position = new Map(mods.map((m, i) => [m.name, i]));
  for (const [i, m] of mods.entries()) {
    for (const dep of m.depends) {
      const at = position.get(dep.replace(/-/g, "_"));
      if (at !== undefined) expect(at, `${dep} before ${m.name}`).toBeLessThan(i);
    }
  }
}

describe("findModulesDir and indexModules", () => {
  it("finds lib/modules/<version> (or usr/lib/modules) in the extracted kernel", () => {
    expect(findModulesDir(kernelRoot, VERSION)).toBe(modulesDir);
    expect(() => findModulesDir(kernelRoot, "5.10.0-1-amd64")).toThrow(/no lib\/modules\/5\.10\.0-1-amd64/);
    const usrRoot = mkdtempSync(path.join(tmpdir(), "ballast-kmod-usr-"));
    try {
      mkdirSync(path.join(usrRoot, "usr/lib/modules", VERSION), { recursive: true });
      expect(findModulesDir(usrRoot, VERSION)).toBe(path.join(usrRoot, "usr/lib/modules", VERSION));
    } finally {
      rmSync(usrRoot, { recursive: true, force: true });
    }
  });

  it("indexes plain .ko files by normalized name, compressed-only names and built-ins", () => {
    const { files, compressed, builtin } = indexModules(modulesDir);
    expect(files.get("net_failover")).toBe(path.join(modulesDir, "kernel/drivers/net/net-failover.ko"));
    expect(files.has("net-failover")).toBe(false);
    expect(files.size).toBe(Object.keys(MODULES).length);
    expect([...compressed]).toEqual(["zmod"]);
    expect([...builtin].sort()).toEqual(["crc32c_generic", "ext4"]);
  });
});

describe("resolveModules", () => {
  it("puts dependencies first, in depends= order, each module once", () => {
    const mods = resolveModules(modulesDir, ["virtio_pci", "virtio_net", "failover", "net_failover"]);
    expect(names(mods)).toEqual(["virtio_pci_legacy_dev", "virtio_ring", "virtio", "virtio_pci", "failover", "net_failover", "virtio_net"]);
    expectDependenciesFirst(mods);
  });

  it("keeps the module's own depends= list and file", () => {
    const mods = resolveModules(modulesDir, ["virtio_net"]);
    const net = mods.find((m) => m.name === "virtio_net");
    expect(net?.depends).toEqual(["net_failover", "virtio_ring", "virtio"]);
    expect(net?.file).toBe(path.join(modulesDir, "kernel/drivers/net/virtio_net.ko"));
    expect(mods.find((m) => m.name === "net_failover")?.depends).toEqual(["failover"]);
    expect(mods.at(-1)?.name).toBe("virtio_net");
  });

  it("accepts '-' for '_' in wanted names", () => {
    expect(names(resolveModules(modulesDir, ["net-failover"]))).toEqual(["failover", "net_failover"]);
  });

  it("skips built-in dependencies", () => {
    expect(names(resolveModules(modulesDir, ["uses_builtin"]))).toEqual(["uses_builtin"]);
  });

  it("names the chain when a dependency is missing, and refuses compressed-only modules", () => {
    expect(() => resolveModules(modulesDir, ["needs_missing"])).toThrow(/kernel module absent_mod \(needed by needs_missing\) not found/);
    expect(() => resolveModules(modulesDir, ["nothing_like_it"])).toThrow(/nothing_like_it \(needed by the guest\)/);
    expect(() => resolveModules(modulesDir, ["needs_compressed"])).toThrow(/zmod is only available compressed/);
  });

  it("reports a dependency cycle with its path", () => {
    expect(() => resolveModules(modulesDir, ["cyc_a"])).toThrow(/module dependency cycle: cyc_a -> cyc_b -> cyc_c -> cyc_a/);
  });
});
