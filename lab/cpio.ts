/**
 * A minimal writer for the "newc" cpio format the kernel unpacks as
 * initramfs. Writing it ourselves sets owner root and creates the
 * /dev/console node without needing root or mknod on the host, and needs no
 * cpio binary.
 *
 * Every entry has uid/gid 0 and mtime 0, and inode numbers count up from 1
 * in the order entries are added, so identical inputs give an identical
 * archive.
 */

/** Builds a newc archive in memory; {@link CpioWriter.finish} appends the trailer and returns the bytes. */
export class CpioWriter {
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
