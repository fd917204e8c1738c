/**
 * Just enough ELF64 reading for the image builder, done in-process so the
 * host needs neither kmod's modinfo nor binutils: the `.modinfo` section of
 * a kernel module, and whether an executable needs a dynamic loader.
 */
import { closeSync, openSync, readSync } from "node:fs";

const ELF_MAGIC = 0x7f454c46;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const PT_INTERP = 3;

/**
 * Reads the `.modinfo` section of an ELF64 little-endian kernel module and
 * returns its key=value pairs (keys can repeat, e.g. alias). Done in-process
 * so the host needs no kmod/modinfo.
 */
export function readModinfo(ko: Buffer): Map<string, string[]> {
  if (ko.readUInt32BE(0) !== ELF_MAGIC || ko[4] !== ELFCLASS64 || ko[5] !== ELFDATA2LSB) throw new Error("not an ELF64 little-endian file");
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

/** True if the ELF file has no PT_INTERP program header (no dynamic loader needed). False for non-ELF or unreadable files. */
export function isStaticElf(file: string): boolean {
  try {
    const fd = openSync(file, "r");
    try {
      const head = Buffer.alloc(64);
      readAt(fd, head, 0);
      if (head.readUInt32BE(0) !== ELF_MAGIC || head[4] !== ELFCLASS64) return false;
      const phoff = Number(head.readBigUInt64LE(0x20));
      const phentsize = head.readUInt16LE(0x36);
      const phnum = head.readUInt16LE(0x38);
      const ph = Buffer.alloc(phentsize * phnum);
      readAt(fd, ph, phoff);
      for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === PT_INTERP) return false;
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
