// Secrets are redacted wherever a caller logs them.
import { mkdtempSync, readFileSync, rmSync, openSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { createLogger } from "../../shared/logger.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function logTo(neverBlock: boolean): { log: ReturnType<typeof createLogger>; read: () => Record<string, unknown>[]; close: () => void } {
  const dir = mkdtempSync(join(tmpdir(), "ballast-log-"));
  dirs.push(dir);
  const file = join(dir, "log");
  const fd = openSync(file, "w");
  const log = createLogger({ name: "t", level: "debug", fd, neverBlock });
  return {
    log,
    read: () => {
      log.flush();
      return readFileSync(file, "utf8").trim().split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    },
    close: () => closeSync(fd),
  };
}

describe("createLogger", () => {
  for (const neverBlock of [false, true]) {
    it(`redacts tokens, keys and passwords (neverBlock ${neverBlock})`, async () => {
      const t = logTo(neverBlock);
      t.log.info({ token: "s3cr3t-token", tls: { key: "-----BEGIN PRIVATE KEY-----x", cert: "public" }, password: "pw", vm: "vm1" }, "config");
      t.log.child({ component: "x" }).warn({ agent: { token: "t2" } }, "hello");
      await new Promise((r) => setTimeout(r, 50));
      const lines = t.read();
      const text = JSON.stringify(lines);
      expect(text).not.toContain("s3cr3t-token");
      expect(text).not.toContain("BEGIN PRIVATE KEY");
      expect(text).not.toContain('"pw"');
      expect(text).not.toContain('"t2"');
      expect(lines[0]).toMatchObject({ token: "[redacted]", password: "[redacted]", vm: "vm1", tls: { key: "[redacted]", cert: "public" } });
      t.close();
    });
  }
});
