/**
 * lab/cpio.ts: the newc archive the kernel unpacks as initramfs, parsed back
 * by an independent reader written from the format description
 * (Documentation/driver-api/early-userspace/buffer-format.rst).
 */
import { describe, expect, it } from "vitest";
import { CpioWriter } from "../../lab/cpio.js";

interface Entry {
  offset: number;
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  devMajor: number;
  devMinor: number;
  rdevMajor: number;
  rdevMinor: number;
  check: number;
  name: string;
  data: Buffer;
}

const FIELDS = ["ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devMajor", "devMinor", "rdevMajor", "rdevMinor", "namesize", "check"] as const;
const align4 = (n: number) => (n + 3) & ~3;

function parseNewc(buf: Buffer): Entry[] {
  const out: Entry[] = [];
  let off = 0;
  for (;;) {
    expect(off % 4).toBe(0);
    expect(buf.toString("latin1", off, off + 6)).toBe("070701");
    const f: Record<string, number> = {};
    FIELDS.forEach((name, i) => {
      const hex = buf.toString("latin1", off + 6 + i * 8, off + 14 + i * 8);
      expect(hex).toMatch(/^[0-9a-f]{8}$/);
      f[name] = parseInt(hex, 16);
    });
    const nameStart = off + 110;
    const namesize = f.namesize!;
    expect(buf[nameStart + namesize - 1]).toBe(0); // NUL-terminated, NUL counted in namesize
    const name = buf.toString("latin1", nameStart, nameStart + namesize - 1);
    const dataStart = align4(nameStart + namesize);
    expect(buf.subarray(nameStart + namesize, dataStart).every((b) => b === 0)).toBe(true);
    const data = buf.subarray(dataStart, dataStart + f.filesize!);
    const next = align4(dataStart + f.filesize!);
    expect(buf.subarray(dataStart + f.filesize!, next).every((b) => b === 0)).toBe(true);
    out.push({
      offset: off,
      ino: f.ino!,
      mode: f.mode!,
      uid: f.uid!,
      gid: f.gid!,
      nlink: f.nlink!,
      mtime: f.mtime!,
      devMajor: f.devMajor!,
      devMinor: f.devMinor!,
      rdevMajor: f.rdevMajor!,
      rdevMinor: f.rdevMinor!,
      check: f.check!,
      name,
      data: Buffer.from(data),
    });
    off = next;
    if (name === "TRAILER!!!") break;
    expect(off).toBeLessThan(buf.length);
  }
  expect(off).toBe(buf.length);
  return out;
}

function sample(): Buffer {
  const cpio = new CpioWriter();
  cpio.dir("bin");
  cpio.dir("dev", 0o700);
  cpio.charDev("dev/console", 5, 1, 0o600);
  cpio.file("bin/busybox", Buffer.from([0x7f, 0x45, 0x4c, 0x46, 1, 2, 3]), 0o755);
  cpio.symlink("bin/sh", "busybox");
  cpio.file("etc/modules", "virtio.ko\nvirtio_ring.ko\n", 0o644);
  cpio.file("empty", "", 0o600);
  return cpio.finish();
}

describe("CpioWriter (newc)", () => {
  it("writes every entry with its type, permissions, contents and link target", () => {
    const entries = parseNewc(sample());
    expect(entries.map((e) => [e.name, e.mode.toString(8), e.nlink])).toEqual([
      ["bin", "40755", 2],
      ["dev", "40700", 2],
      ["dev/console", "20600", 1],
      ["bin/busybox", "100755", 1],
      ["bin/sh", "120777", 1],
      ["etc/modules", "100644", 1],
      ["empty", "100600", 1],
      ["TRAILER!!!", "0", 1],
    ]);
    const byName = new Map(entries.map((e) => [e.name, e]));
    expect([...byName.get("bin/busybox")!.data]).toEqual([0x7f, 0x45, 0x4c, 0x46, 1, 2, 3]);
    expect(byName.get("bin/sh")!.data.toString()).toBe("busybox");
    expect(byName.get("etc/modules")!.data.toString()).toBe("virtio.ko\nvirtio_ring.ko\n");
    expect(byName.get("empty")!.data.length).toBe(0);
    expect(byName.get("bin")!.data.length).toBe(0);
  });

  it("makes /dev/console a character device 5:1 and nothing else a device", () => {
    for (const e of parseNewc(sample())) {
      if (e.name === "dev/console") expect([e.rdevMajor, e.rdevMinor]).toEqual([5, 1]);
      else expect([e.rdevMajor, e.rdevMinor]).toEqual([0, 0]);
      expect([e.devMajor, e.devMinor]).toEqual([0, 0]);
    }
  });

  it("owns everything by root with mtime 0 and numbers inodes 1, 2, 3, … (trailer 0)", () => {
    const entries = parseNewc(sample());
    for (const e of entries) expect([e.uid, e.gid, e.mtime, e.check]).toEqual([0, 0, 0, 0]);
    expect(entries.map((e) => e.ino)).toEqual([1, 2, 3, 4, 5, 6, 7, 0]);
  });

  it("is byte-for-byte deterministic", () => {
    expect(sample().equals(sample())).toBe(true);
  });

  it("pads names and data to 4 bytes exactly as the format says", () => {
    const cpio = new CpioWriter();
    cpio.file("ab", "xyz", 0o644); // 110 + 3 = 113 -> name pad 3; data 3 -> pad 1
    const buf = cpio.finish();
    const header =
      "070701" +
      ["00000001", "000081a4", "00000000", "00000000", "00000001", "00000000", "00000003", "00000000", "00000000", "00000000", "00000000", "00000003", "00000000"].join("");
    expect(buf.toString("latin1", 0, 110)).toBe(header);
    expect([...buf.subarray(110, 116)]).toEqual([0x61, 0x62, 0, 0, 0, 0]);
    expect(buf.toString("latin1", 116, 119)).toBe("xyz");
    expect(buf[119]).toBe(0);
    expect(buf.toString("latin1", 120, 126)).toBe("070701");
    // Trailer: 110 + "TRAILER!!!\0" (11) = 121 -> 124, no data.
    expect(buf.length).toBe(120 + 124);
  });
});
