/**
 * lab/elf.ts: `.modinfo` parsing and the static-ELF check, on synthetic
 * ELF64 files (test/unit/synthetic-elf.ts) and on the node binary itself.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { isStaticElf, readModinfo } from "../../lab/elf.js";
import { PT_INTERP, PT_LOAD, syntheticElf, syntheticKo } from "./synthetic-elf.js";

describe("readModinfo", () => {
  it("returns every key=value of .modinfo, repeated keys in order", () => {
    const info = readModinfo(
      syntheticKo(["license=GPL", "depends=virtio,virtio_ring", "alias=virtio:d00000005v*", "alias=pci:v00001AF4d00001002sv*", "vermagic=6.1.0-57-amd64 SMP mod_unload"]),
    );
    expect([...info.keys()]).toEqual(["license", "depends", "alias", "vermagic"]);
    expect(info.get("depends")).toEqual(["virtio,virtio_ring"]);
    expect(info.get("alias")).toEqual(["virtio:d00000005v*", "pci:v00001AF4d00001002sv*"]);
    expect(info.get("vermagic")).toEqual(["6.1.0-57-amd64 SMP mod_unload"]);
  });

  it("reads only the .modinfo section, not other sections with key=value text", () => {
    expect(readModinfo(syntheticKo(["depends="])).get("depends")).toEqual([""]);
  });

  it("splits at the first '=' and skips padding and entries without a key", () => {
    const info = readModinfo(syntheticKo(["parm=debug:level=0..3 (int)", "=nokey", "noequals"]));
    expect(info.get("parm")).toEqual(["debug:level=0..3 (int)"]);
    expect(info.size).toBe(1);
  });

  it("rejects files that are not ELF64 little-endian or have no .modinfo", () => {
    expect(() => readModinfo(Buffer.from("#!/bin/sh\necho not an elf\n".padEnd(128)))).toThrow(/not an ELF64 little-endian/);
    expect(() => readModinfo(syntheticElf({ elfClass: 1, sections: [{ name: ".modinfo", data: "a=b\0" }] }))).toThrow(/not an ELF64/);
    const bigEndian = syntheticKo(["a=b"]);
    bigEndian[5] = 2;
    expect(() => readModinfo(bigEndian)).toThrow(/not an ELF64 little-endian/);
    expect(() => readModinfo(syntheticElf({ sections: [{ name: ".text", data: "depends=x\0" }] }))).toThrow(/no .modinfo section/);
  });
});

describe("isStaticElf", () => {
  const dir = mkdtempSync(path.join(tmpdir(), "ballast-elf-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const file = (name: string, data: Buffer | string) => {
    const p = path.join(dir, name);
    writeFileSync(p, data);
    return p;
  };

  it("is true for an ELF64 with program headers but no PT_INTERP", () => {
    expect(isStaticElf(file("static", syntheticElf({ programHeaders: [PT_LOAD, PT_LOAD, 4] })))).toBe(true);
  });

  it("is false when any program header is PT_INTERP", () => {
    expect(isStaticElf(file("dynamic", syntheticElf({ programHeaders: [PT_LOAD, PT_INTERP, PT_LOAD] })))).toBe(false);
    expect(isStaticElf(file("dynamic-last", syntheticElf({ programHeaders: [PT_LOAD, PT_LOAD, PT_INTERP] })))).toBe(false);
  });

  it("is false for the (dynamically linked) node binary", () => {
    expect(isStaticElf(process.execPath)).toBe(false);
  });

  it("is false for non-ELF, 32-bit, empty and missing files", () => {
    expect(isStaticElf(file("script", "#!/bin/sh\nexit 0\n".padEnd(128)))).toBe(false);
    expect(isStaticElf(file("elf32", syntheticElf({ elfClass: 1, programHeaders: [PT_LOAD] })))).toBe(false);
    expect(isStaticElf(file("empty", ""))).toBe(false);
    expect(isStaticElf(path.join(dir, "does-not-exist"))).toBe(false);
  });
});
