/**
 * The coordinator process as an operator meets it: reflection and health via
 * `buf curl`, and ballastctl's answers to bad requests. No QEMU is needed:
 * the VM's QMP socket does not exist, which is itself a state to report.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCtl, startCoordinatorProcess, type CoordinatorProcess } from "../../lab/coordinator-process.js";

const run = promisify(execFile);
const BUF = resolve(import.meta.dirname, "../../node_modules/.bin/buf");
let dir = "";
let co: CoordinatorProcess;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "ballast-api-"));
  co = await startCoordinatorProcess(dir, "api", { hostId: "api-host", listen: "127.0.0.1:0", vms: [{ name: "vm1", qmpSocket: join(dir, "absent.qmp") }] });
});

afterAll(async () => {
  await co?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const curl = (...args: string[]) => run(BUF, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args]);

describe("coordinator API surface", () => {
  it("lists every service through reflection", async () => {
    const { stdout } = await curl("--list-services", `http://${co.address}`);
    expect(stdout.trim().split("\n").sort()).toEqual([
      "ballast.v1.AgentService",
      "ballast.v1.MigrationService",
      "ballast.v1.PeerService",
      "ballast.v1.VmService",
      "grpc.health.v1.Health",
    ]);
  });

  it("answers SERVING on health", async () => {
    const { stdout } = await curl(`http://${co.address}/grpc.health.v1.Health/Check`);
    expect(JSON.parse(stdout)).toEqual({ status: "SERVING" });
  });

  it("describes a VM whose QEMU is not reachable", async () => {
    const { stdout } = await curl("-d", '{"name":"vm1"}', `http://${co.address}/ballast.v1.VmService/GetVm`);
    const vm = JSON.parse(stdout).vm;
    expect(vm.name).toBe("vm1");
    expect(vm.qmpConnected ?? false).toBe(false);
    expect(vm.agentConnected ?? false).toBe(false);
  });

  it.each([
    ["an unknown VM", ["migrate", "nope", "--to", "127.0.0.1:1"], 3, "no VM named"],
    ["a VM without QMP", ["migrate", "vm1", "--to", "127.0.0.1:1"], 1, "no QMP connection"],
    ["a bad destination", ["migrate", "vm1", "--to", "nowhere"], 3, "destination: not a host:port"],
    ["an unknown mode", ["migrate", "vm1", "--to", "127.0.0.1:1", "--mode", "sideways"], 2, "--mode: expected one of"],
    ["an unknown migration", ["get", "0000"], 3, "no migration"],
    ["cancel of an unknown migration", ["cancel", "0000"], 3, "no migration"],
    ["a missing command", [], 2, "expected one command"],
  ])("ballastctl reports %s clearly", async (_n, args, code, text) => {
    const r = await runCtl(["--server", co.address, ...args]);
    expect(r.code).toBe(code);
    expect(r.stdout + r.stderr).toContain(text);
  });
});
