/**
 * Vitest global setup: runs the lab's host preflight (lab/preflight.ts)
 * once, before any test file, when the run includes QEMU tests, so that
 * `npm ci && npm test` on a fresh Debian machine (as root) installs QEMU,
 * busybox-static, socat and squashfs-tools by itself. A unit-only run
 * (`vitest run test/unit`) installs nothing.
 *
 * "QEMU tests" means any file under test/integration/: most of them start
 * QEMU, and the one that does not (coordinator-api) costs nothing extra on a
 * machine that has the packages.
 */
import path from "node:path";
import type { TestProject } from "vitest/node";
import { ensureHostPackages, HOST_PACKAGES } from "../lab/preflight.js";

const INTEGRATION_DIR = `${path.sep}test${path.sep}integration${path.sep}`;

export default async function setup(project: TestProject): Promise<void> {
  const files = await selectedTestFiles(project);
  if (files !== undefined && !files.some((f) => f.includes(INTEGRATION_DIR))) return;
  const installed = await ensureHostPackages({ onProgress: (step) => process.stdout.write(`[preflight] ${step}\n`) });
  if (installed.length > 0) process.stdout.write(`[preflight] installed ${installed.join(" ")} (of ${HOST_PACKAGES.join(" ")})\n`);
}

/**
 * The test files this run will execute, or undefined when that cannot be
 * told (then the preflight runs, which is the safe side). Vitest passes the
 * command line's file filters to the run but not to global setup, so they
 * are read from the Vitest instance (an internal field in vitest 4).
 */
async function selectedTestFiles(project: TestProject): Promise<string[] | undefined> {
  try {
    const filters = (project.vitest as unknown as { filenamePattern?: string[] }).filenamePattern;
    const specs = await project.vitest.globTestSpecifications(filters ?? []);
    return specs.map((s) => s.moduleId);
  } catch {
    return undefined;
  }
}
