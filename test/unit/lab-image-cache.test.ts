/**
 * lab/image-cache.ts: stamps mark complete images, and pruning keeps the
 * recently used ones (other test processes may be using older images).
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { IMAGE_INITRD, IMAGE_ROOTFS, isValidStamp, pruneDataDisks, pruneImages, sha256, stampPath, writeStamp, type BuildInputs } from "../../lab/image-cache.js";
import { silentLogger } from "../../shared/logger.js";

let dir = "";
beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), "ballast-cache-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const log = silentLogger();
const DEAD_PID = 2 ** 22 + 12345; // above Linux's pid_max (2^22)

function image(name: string, hash: string, ageMs: number): string {
  const d = path.join(dir, "images", name);
  mkdirSync(d, { recursive: true });
  writeFileSync(path.join(d, IMAGE_INITRD), "i");
  writeFileSync(path.join(d, IMAGE_ROOTFS), "r");
  writeStamp(d, { hash, summary: { builder: 0 } } as unknown as BuildInputs, { initramfsBytes: 1, rootfsBytes: 1 });
  const t = new Date(Date.now() - ageMs);
  utimesSync(stampPath(d), t, t);
  return d;
}

describe("stamps", () => {
  it("are valid only for the same hash with both image files present", () => {
    const d = image("a", "hash-a", 0);
    expect(isValidStamp(d, "hash-a")).toBe(true);
    expect(isValidStamp(d, "hash-b")).toBe(false);
    rmSync(path.join(d, IMAGE_ROOTFS));
    expect(isValidStamp(d, "hash-a")).toBe(false);
    expect(isValidStamp(path.join(dir, "images", "absent"), "hash-a")).toBe(false);
  });

  it("sha256 is hex SHA-256", () => {
    expect(sha256("abc")).toBe("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  });
});

describe("pruneImages", () => {
  it("keeps the image in use plus the five most recently stamped, and drops dead builders' .tmp folders", () => {
    for (let i = 0; i < 8; i++) image(`img${i}`, `h${i}`, i * 60_000); // img0 newest
    const keep = image("current", "hc", 10 * 60 * 60_000); // oldest, but in use
    mkdirSync(path.join(dir, "images", `half.tmp-${DEAD_PID}`));
    mkdirSync(path.join(dir, "images", `live.tmp-${process.pid}`));
    pruneImages(path.join(dir, "images"), keep, log);
    expect(readdirSync(path.join(dir, "images")).sort()).toEqual(["current", "img0", "img1", "img2", "img3", "img4", `live.tmp-${process.pid}`]);
  });
});

describe("pruneDataDisks", () => {
  it("removes disks unused for an hour and dead builders' leftovers, keeps the current and recent ones", () => {
    const data = path.join(dir, "data");
    mkdirSync(data);
    const file = (name: string, ageMs: number) => {
      const p = path.join(data, name);
      writeFileSync(p, "d");
      const t = new Date(Date.now() - ageMs);
      utimesSync(p, t, t);
      return p;
    };
    const keep = file("data-current.squashfs", 2 * 60 * 60_000);
    file("data-old.squashfs", 2 * 60 * 60_000);
    file("data-recent.squashfs", 5 * 60_000);
    file(`data-x.squashfs.tmp-${DEAD_PID}`, 0);
    file(`data-y.squashfs.tmp-${process.pid}`, 2 * 60 * 60_000);
    mkdirSync(path.join(data, `.empty-${DEAD_PID}`));
    const legacy = path.join(dir, "data.img");
    writeFileSync(legacy, "raw");
    utimesSync(legacy, new Date(0), new Date(0));
    pruneDataDisks(dir, keep, log);
    expect(readdirSync(data).sort()).toEqual(["data-current.squashfs", "data-recent.squashfs", `data-y.squashfs.tmp-${process.pid}`]);
    expect(readdirSync(dir).sort()).toEqual(["data"]);
  });
});
