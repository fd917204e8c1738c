/**
 * Builds tiny ELF64 little-endian files for the lab's ELF tests: named
 * sections (for `.modinfo`) and program headers (for PT_INTERP). Only the
 * fields lab/elf.ts reads are meaningful; the rest is zero.
 */

export const PT_LOAD = 1;
export const PT_INTERP = 3;

export interface SyntheticElf {
  /** Sections after the null section, in order; `.shstrtab` is appended. */
  sections?: Array<{ name: string; data: Buffer | string }>;
  /** p_type of each program header. */
  programHeaders?: number[];
  /** ELF class byte: 2 = 64-bit (default), 1 = 32-bit. */
  elfClass?: number;
}

const EHDR = 64;
const PHENT = 56;
const SHENT = 64;

export function syntheticElf(o: SyntheticElf = {}): Buffer {
  const sections = [...(o.sections ?? [])].map((s) => ({ name: s.name, data: typeof s.data === "string" ? Buffer.from(s.data, "latin1") : s.data }));
  const phTypes = o.programHeaders ?? [];

  // Section name string table: "\0" then each name, then ".shstrtab".
  const names = [...sections.map((s) => s.name), ".shstrtab"];
  const nameOffsets: number[] = [];
  let strtab = Buffer.from([0]);
  for (const n of names) {
    nameOffsets.push(strtab.length);
    strtab = Buffer.concat([strtab, Buffer.from(`${n}\0`, "latin1")]);
  }
  const allSections = [...sections, { name: ".shstrtab", data: strtab }];

  // Layout: ELF header, program headers, section data, section headers.
  const phoff = EHDR;
  let offset = phoff + PHENT * phTypes.length;
  const dataOffsets: number[] = [];
  for (const s of allSections) {
    dataOffsets.push(offset);
    offset += s.data.length;
  }
  const shoff = offset + ((8 - (offset % 8)) % 8);
  const shnum = allSections.length + 1; // + null section
  const out = Buffer.alloc(shoff + SHENT * shnum);

  out.writeUInt32BE(0x7f454c46, 0);
  out[4] = o.elfClass ?? 2;
  out[5] = 1; // little-endian
  out[6] = 1; // EV_CURRENT
  out.writeUInt16LE(phTypes.length > 0 ? 2 : 1, 0x10); // ET_EXEC or ET_REL
  out.writeUInt16LE(0x3e, 0x12); // x86-64
  out.writeUInt32LE(1, 0x14);
  out.writeBigUInt64LE(BigInt(phTypes.length > 0 ? phoff : 0), 0x20);
  out.writeBigUInt64LE(BigInt(shoff), 0x28);
  out.writeUInt16LE(EHDR, 0x34);
  out.writeUInt16LE(PHENT, 0x36);
  out.writeUInt16LE(phTypes.length, 0x38);
  out.writeUInt16LE(SHENT, 0x3a);
  out.writeUInt16LE(shnum, 0x3c);
  out.writeUInt16LE(shnum - 1, 0x3e); // .shstrtab is last

  phTypes.forEach((type, i) => out.writeUInt32LE(type, phoff + i * PHENT));
  allSections.forEach((s, i) => {
    s.data.copy(out, dataOffsets[i]!);
    const base = shoff + (i + 1) * SHENT;
    out.writeUInt32LE(nameOffsets[i]!, base);
    out.writeUInt32LE(s.name === ".shstrtab" ? 3 : 1, base + 4); // SHT_STRTAB / SHT_PROGBITS
    out.writeBigUInt64LE(BigInt(dataOffsets[i]!), base + 24);
    out.writeBigUInt64LE(BigInt(s.data.length), base + 32);
  });
  return out;
}

/** A kernel module whose `.modinfo` holds these key=value entries (NUL-separated, with padding like real modules). */
export function syntheticKo(modinfo: string[]): Buffer {
  return syntheticElf({
    sections: [
      { name: ".text", data: Buffer.alloc(16, 0x90) },
      // A decoy that must not be read as modinfo.
      { name: ".rodata", data: "depends=decoy\0" },
      { name: ".modinfo", data: `\0\0${modinfo.join("\0")}\0\0\0` },
    ],
  });
}
