// The CLI (main called directly, and the built bundle when present) and the strict config.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { USAGE, applyConfigObject, defaultConfig, loadConfigFile, parseCommand, runtimeOptionsOf } from "../../agent/config.js";
import { UsageError } from "../../agent/errors.js";
import { main } from "../../agent/main.js";
import { ConfigError } from "../../shared/errors.js";
import * as grpc from "@grpc/grpc-js";
import { AgentService, type SessionRequest } from "../../gen/ballast/v1/agent_pb.js";
import { addService } from "../../shared/grpc-adapter.js";
import { silentLogger } from "../../shared/logger.js";

const MiB = 1024 * 1024;
const HOST = "test/fixtures/proc/host-debian12";
const HOST_SYS = "test/fixtures/proc/host-debian12-sys";
const BUNDLE = "dist/ballast-agent.mjs";
const noFile = () => false;

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
function tmpFile(name: string, text: string): string {
  const d = mkdtempSync(join(tmpdir(), "ballast-agent-cli-"));
  dirs.push(d);
  const p = join(d, name);
  writeFileSync(p, text);
  return p;
}

async function run(argv: string[]) {
  let stdout = "";
  let stderr = "";
  const code = await main(argv, { stdout: (t) => (stdout += t), stderr: (t) => (stderr += t) });
  return { code, stdout, stderr };
}

function checkReport(report: Record<string, any>) {
  expect(report.procRoot).toBe(HOST);
  expect(report.sample.meminfo.memTotal).toBeGreaterThan(0);
  expect(report.sample.vmstat).toHaveProperty("workingsetRefaultFile");
  expect(report.sample.psi.some).toHaveProperty("avg10");
  expect(report.sample.watermarks.source).toBe("zoneinfo");
  expect(report.estimate).toHaveProperty("workingSetBytes");
  expect(report.pressure.under).toBe(false);
  const { steady, prepare } = report.decisions;
  expect(steady.targetBytes).toBeGreaterThanOrEqual(report.bounds.floorBytes);
  expect(prepare.reason).toBe("prepare");
  expect(prepare.targetBytes).toBeLessThanOrEqual(steady.targetBytes);
  expect(prepare.targetBytes).toBeGreaterThanOrEqual(report.bounds.floorBytes);
  expect(prepare.detail).toContain("reserve 128.0 MiB");
}

describe("ballast-agent sample", () => {
  it("prints one reading and both decisions as JSON (main called directly)", async () => {
    const { code, stdout, stderr } = await run(["sample", "--proc-root", HOST, "--sys-root", HOST_SYS]);
    expect(stderr).toBe("");
    expect(code).toBe(0);
    const report = JSON.parse(stdout);
    checkReport(report);
    expect(report.sample.balloon.deflateOnOom).toBe(true);
  });

  it("applies --ram, --floor, --max and --reserve", async () => {
    const { stdout } = await run(["sample", "--proc-root", HOST, "--ram", "32GiB", "--floor", "2GiB", "--max", "16GiB", "--reserve", "256MiB"]);
    const report = JSON.parse(stdout);
    expect(report.estimate.ramSource).toBe("coordinator");
    expect(report.bounds).toEqual({ floorBytes: 2048 * MiB, maxBytes: 16384 * MiB });
    expect(report.estimate.reserveBytes).toBe(256 * MiB);
    expect(report.decisions.prepare.targetBytes).toBeGreaterThanOrEqual(2048 * MiB);
  });

  it("exits 1 naming the file when the proc root is incomplete", async () => {
    const { code, stderr } = await run(["sample", "--proc-root", "/nonexistent-proc"]);
    expect(code).toBe(1);
    expect(stderr).toContain("/nonexistent-proc/meminfo");
  });

  it.skipIf(!existsSync(BUNDLE))("the built bundle prints the same JSON", () => {
    const out = execFileSync(process.execPath, [BUNDLE, "sample", "--proc-root", HOST], { encoding: "utf8" });
    checkReport(JSON.parse(out));
  });

  it.skipIf(!existsSync(BUNDLE))("the built bundle exits 2 on a bad flag", () => {
    const r = spawnSync(process.execPath, [BUNDLE, "run", "--bogus"], { encoding: "utf8" });
    expect(r.status).toBe(2);
    expect(r.stderr).toContain("--bogus");
  });
});

describe("ballast-agent run", () => {
  it("attaches with hello, samples, and exits 0 on the stop signal", async () => {
    const got: SessionRequest[] = [];
    const server = new grpc.Server();
    addService(
      server,
      AgentService,
      {
        session: async (ctx) => {
          for await (const r of ctx) {
            got.push(r);
            if (r.msg.case === "hello") await ctx.send({ msg: { case: "welcome", value: { hostId: "h1", vmName: "vm" } } });
          }
        },
      },
      (err) => ({ code: grpc.status.INTERNAL, details: String(err) }),
    );
    const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
    try {
      let stop: () => void = () => undefined;
      const stopSignal = new Promise<void>((r) => (stop = r));
      const argv = ["run", "--coordinator", `127.0.0.1:${port}`, "--proc-root", HOST, "--sys-root", HOST_SYS, "--vm-id", "cli-vm", "--no-drop-caches"];
      const done = main(argv, { stdout: () => undefined, stderr: () => undefined, stopSignal, logger: silentLogger() });
      const end = Date.now() + 8000;
      while (!got.some((r) => r.msg.case === "sample") && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      expect(got[0]?.msg.case).toBe("hello");
      expect(got[0]?.msg.value).toMatchObject({ vmId: "cli-vm" });
      expect(got.some((r) => r.msg.case === "sample")).toBe(true);
      stop();
      expect(await done).toBe(0);
    } finally {
      server.forceShutdown();
    }
  });
});

describe("usage errors exit 2 with a clear message", () => {
  it.each([
    [[], "missing command"],
    [["frobnicate"], "unknown command"],
    [["run", "--bogus"], "--bogus"],
    [["run", "--reserve", "lots"], "--reserve"],
    [["run", "--coordinator", "nohost"], "host:port"],
    [["run", "--sample-interval-ms", "5"], "--sample-interval-ms"],
    [["run", "--log-level", "loud"], "--log-level"],
    [["run", "--ram", "1GiB"], "only for \"sample\""],
    [["sample", "extra"], "unexpected argument"],
    [["run", "--config", "/nonexistent/agent.json"], "/nonexistent/agent.json"],
  ])("%j", async (argv, text) => {
    const { code, stderr, stdout } = await run(argv);
    expect(code).toBe(2);
    expect(stderr).toContain(text);
    expect(stdout).toBe("");
  });

  it("--help prints usage and exits 0", async () => {
    const { code, stdout } = await run(["--help"]);
    expect(code).toBe(0);
    expect(stdout).toContain("ballast-agent run");
    expect(stdout).toContain("--no-drop-caches");
  });
});

describe("config", () => {
  it("defaults", () => {
    const c = parseCommand(["run"], noFile);
    expect(c).toMatchObject({ kind: "run", config: { coordinator: "10.0.2.100:50051", procRoot: "/proc", sysRoot: "/sys", sampleIntervalMs: 1000, reportIntervalMs: 5000, dropCaches: true, logLevel: "info" } });
    if (c.kind !== "run") throw new Error("unreachable");
    expect(c.config.policy.reserveBytes).toBe(128 * MiB);
    expect(c.config.vmId.length).toBeGreaterThan(0);
  });

  it("flags override the file, which overrides the defaults", () => {
    const file = tmpFile("agent.json", JSON.stringify({ coordinator: "10.0.2.100:6000", vmId: "from-file", reserve: "192MiB", sampleIntervalMs: 500, reportIntervalMs: 0, tuning: { growStepBytes: "64MiB", psiSomeThresholdPct: 20, alignBytes: "2MiB" } }));
    const c = parseCommand(["run", "--config", file, "--vm-id", "from-flag", "--no-drop-caches", "--log-level", "debug", "--proc-root", "/p", "--sys-root", "/s"], noFile);
    if (c.kind !== "run") throw new Error("unreachable");
    expect(c.config).toMatchObject({ coordinator: "10.0.2.100:6000", vmId: "from-flag", sampleIntervalMs: 500, dropCaches: false, logLevel: "debug", procRoot: "/p", sysRoot: "/s" });
    expect(c.config.policy).toMatchObject({ reserveBytes: 192 * MiB, growStepBytes: 64 * MiB, psiSomeThresholdPct: 20, alignBytes: 2 * MiB });
    expect(runtimeOptionsOf(c.config)).toMatchObject({ sampleIntervalMs: 500, dropCaches: false, reportEveryMs: 0 });
  });

  it("reads the default file only when it exists", () => {
    expect(() => parseCommand(["run"], () => true)).toThrow(/\/etc\/ballast\/agent\.json/);
  });

  it.each([
    [{ coordnator: "x:1" }, 'unknown key "coordnator"'],
    [{ tuning: { growStep: 1 } }, 'tuning: unknown key "growStep"'],
    [{ reserve: "a lot" }, "reserve"],
    [{ sampleIntervalMs: 10 }, "sampleIntervalMs"],
    [{ dropCaches: "yes" }, "dropCaches"],
    [{ reportIntervalMs: -1 }, "reportIntervalMs"],
    [{ tuning: { prepareActiveFileKeep: 2 } }, "prepareActiveFileKeep"],
    [{ logLevel: "loud" }, "logLevel"],
    [[], "expected an object"],
  ])("rejects %j", (obj, text) => {
    expect(() => applyConfigObject(defaultConfig(), obj, "/etc/ballast/agent.json")).toThrow(ConfigError);
    expect(() => applyConfigObject(defaultConfig(), obj, "/etc/ballast/agent.json")).toThrow(text);
  });

  it.each([
    [{ zeroFree: true }, '/etc/ballast/agent.json: "zeroFree" is no longer supported'],
    [{ zeroFree: false }, '/etc/ballast/agent.json: "zeroFree" is no longer supported'],
    [{ tuning: { zeroMaxBytes: "256MiB" } }, '/etc/ballast/agent.json.tuning: "zeroMaxBytes" is no longer supported'],
  ])("an old file with a zero-free setting: a clear error naming the file and the key (%j)", (obj, text) => {
    expect(() => applyConfigObject(defaultConfig(), obj, "/etc/ballast/agent.json")).toThrow(ConfigError);
    expect(() => applyConfigObject(defaultConfig(), obj, "/etc/ballast/agent.json")).toThrow(text);
    expect(() => applyConfigObject(defaultConfig(), obj, "/etc/ballast/agent.json")).toThrow("delete the key");
  });

  it("the removed --zero-free flag: a usage error that says so", () => {
    expect(() => parseCommand(["run", "--zero-free"], noFile)).toThrow(UsageError);
    expect(() => parseCommand(["run", "--zero-free"], noFile)).toThrow("--zero-free is no longer supported");
    expect(USAGE).not.toContain("zero");
  });

  it("names the file on invalid JSON", () => {
    const file = tmpFile("bad.json", "{ nope");
    expect(() => loadConfigFile(defaultConfig(), file)).toThrow(file);
  });

  it("UsageError for flags, ConfigError for files", () => {
    expect(() => parseCommand(["run", "--nope"], noFile)).toThrow(UsageError);
    expect(() => parseCommand(["run", "--config", tmpFile("x.json", '{"x":1}')], noFile)).toThrow(ConfigError);
  });
});
