/**
 * lab/preflight.ts: the host package list is the one CI installs, and it
 * holds only what the lab runs (the initramfs is written in TypeScript, so
 * no cpio binary).
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { HOST_PACKAGES, HOST_TOOLS } from "../../lab/preflight.js";

describe("host packages", () => {
  it("match the apt list in .ci/run", () => {
    const ci = readFileSync(new URL("../../.ci/run", import.meta.url), "utf8");
    const list = /^for p in ([^;]+); do$/m.exec(ci)?.[1]?.split(/\s+/);
    expect(list).toBeDefined();
    expect([...HOST_PACKAGES].sort()).toEqual([...(list ?? [])].sort());
  });

  it("are the packages of the required tools, each named with why it is needed", () => {
    expect([...HOST_PACKAGES].sort()).toEqual(["busybox-static", "qemu-system-x86", "socat", "squashfs-tools"]);
    expect(HOST_TOOLS.map((t) => t.command)).not.toContain("cpio");
    for (const t of HOST_TOOLS) expect(t.why.length, t.command).toBeGreaterThan(10);
    expect(HOST_TOOLS.find((t) => t.command === "busybox")?.staticElf).toBe(true);
  });
});
