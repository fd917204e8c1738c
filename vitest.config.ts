import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Installs the lab's host packages (QEMU, busybox-static, ...) when QEMU tests are selected.
    globalSetup: ["test/global-setup.ts"],
    // Integration tests drive real QEMU processes; run files one at a time on this 2-core machine.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 300_000,
    reporters: ["default"],
  },
});
