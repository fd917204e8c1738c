/**
 * lab/rootfs.ts: the staging tree for the guest root resolves guest paths
 * inside itself, so a copied absolute symlink (merged /usr, ld-linux) never
 * makes a write land on the host.
 */
import { existsSync, lstatSync, mkdtempSync, readFileSync, readlinkSync, realpathSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { GUEST_FILE_NAMES, loadGuestFiles, requireGuestFile, Staging } from "../../lab/rootfs.js";

let dir = "";
beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), "ballast-staging-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe("Staging", () => {
  it("writes through an absolute symlink into the staging tree, not the host", () => {
    const root = new Staging(dir);
    const unique = `ballast-staging-test-${process.pid}-${Date.now()}.so`;
    root.symlink("/lib", "/usr/lib");
    root.writeFile(`/lib/${unique}`, "lib", 0o644);
    expect(readFileSync(path.join(dir, "usr/lib", unique), "utf8")).toBe("lib");
    expect(lstatSync(path.join(dir, "lib")).isSymbolicLink()).toBe(true);
    expect(readlinkSync(path.join(dir, "lib"))).toBe("/usr/lib");
    expect(existsSync(path.join("/usr/lib", unique))).toBe(false);
    expect(root.exists(`/lib/${unique}`)).toBe(true);
    expect(root.exists("/lib/other.so")).toBe(false);
  });

  it("follows relative and chained symlinks and sets the mode", () => {
    const root = new Staging(dir);
    root.symlink("/usr/lib", "lib64");
    root.symlink("/usr/lib64", "/opt/real");
    root.writeFile("/usr/lib/x/tool", "#!/bin/sh\n", 0o755);
    const host = path.join(dir, "opt/real/x/tool");
    expect(readFileSync(host, "utf8")).toBe("#!/bin/sh\n");
    expect(statSync(host).mode & 0o777).toBe(0o755);
  });

  it("mkdirp resolves through symlinks; symlink does not replace an existing entry", () => {
    const root = new Staging(dir);
    root.symlink("/var/tmp", "/tmp");
    root.mkdirp("/var/tmp/sub");
    expect(statSync(path.join(dir, "tmp/sub")).isDirectory()).toBe(true);
    root.symlink("/var/tmp", "/elsewhere");
    expect(readlinkSync(path.join(dir, "var/tmp"))).toBe("/tmp");
  });

  it("rejects symlink loops", () => {
    const root = new Staging(dir);
    root.symlink("/a", "/b");
    root.symlink("/b", "/a");
    expect(() => root.writeFile("/a/file", "x", 0o644)).toThrow(/too many symlinks/);
  });

  it("mirrors a host file with the symlinks on its path (merged /usr, /bin/sh -> dash)", () => {
    const root = new Staging(dir);
    const hostFile = "/bin/sh";
    root.mirrorHost(hostFile);
    // Every symlink met on the host path is recreated with the same target ...
    let cur = "/";
    for (const part of hostFile.split("/").filter(Boolean)) {
      const next = path.posix.join(cur, part);
      if (lstatSync(next).isSymbolicLink()) {
        expect(readlinkSync(path.join(dir, next)), next).toBe(readlinkSync(next));
        break; // mirrorHost continues at the link target, checked below
      }
      cur = next;
    }
    // ... and the real file is copied at its real path, with its mode.
    const real = realpathSync(hostFile);
    expect(readFileSync(path.join(dir, real)).equals(readFileSync(real))).toBe(true);
    expect(statSync(path.join(dir, real)).mode & 0o7777).toBe(statSync(real).mode & 0o7777);
  });
});

describe("guest files", () => {
  it("loads every file the image needs from lab/guest/", () => {
    const files = loadGuestFiles();
    expect(Object.keys(files)).toEqual([...GUEST_FILE_NAMES]);
    expect(requireGuestFile(files, "initramfs-init.sh")).toMatch(/^#!/);
    expect(() => requireGuestFile(files, "nope")).toThrow(/guest file nope not loaded/);
  });
});
