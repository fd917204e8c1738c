/**
 * The coordinator process as an operator meets it: reflection and health via
 * `buf curl`, and ballastctl's answers to bad requests: its exit code per
 * refusal (README "CLI") and an `error: <message> (<CODE>[, field <f>])`
 * line decoded from the google.rpc details, never grpc-js internals. The
 * first block needs no QEMU (the VM's QMP socket does not exist, which is
 * itself a state to report); the second runs two bare QEMUs for refusals
 * that need a live source VM.
 */
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCtl, startCoordinatorProcess, waitForVm, type CoordinatorProcess } from "../../lab/coordinator-process.js";
import { VmService } from "../../gen/ballast/v1/vm_pb.js";
import { createClient } from "../../shared/grpc-adapter.js";
import { freePort } from "../../shared/net.js";
import { startBareQemu, type BareQemu } from "../helpers/bare-qemu.js";

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
    ["an unknown VM", ["migrate", "nope", "--to", "127.0.0.1:1"], 4, 'error: no VM named "nope" on this host (NOT_FOUND)'],
    ["a VM without QMP", ["migrate", "vm1", "--to", "127.0.0.1:1"], 7, "refused before anything moved: the source VM cannot be inspected: VM vm1: the qmp connection is down (UNAVAILABLE)"],
    ["a bad destination", ["migrate", "vm1", "--to", "nowhere"], 5, 'error: --to: not a host:port address: "nowhere" (INVALID_ARGUMENT, field destination)'],
    ["a bad flag value", ["migrate", "vm1", "--to", "127.0.0.1:1", "--downtime-ms", "70000"], 5, "error: --downtime-ms: 70000 is above the maximum of 60000 (INVALID_ARGUMENT, field downtime_limit_ms)"],
    ["a too low bandwidth", ["migrate", "vm1", "--to", "127.0.0.1:1", "--bandwidth", "10"], 5, "(INVALID_ARGUMENT, field max_bandwidth_bytes_per_sec)"],
    ["--postcopy-after without hybrid", ["migrate", "vm1", "--to", "127.0.0.1:1", "--postcopy-after", "2"], 5, "error: --postcopy-after applies only to --mode hybrid (INVALID_ARGUMENT, field postcopy_after_passes)"],
    ["an unknown mode", ["migrate", "vm1", "--to", "127.0.0.1:1", "--mode", "sideways"], 2, "--mode: expected one of"],
    ["a bandwidth that is not a size", ["migrate", "vm1", "--to", "127.0.0.1:1", "--bandwidth", "fast"], 2, "--bandwidth: not a size"],
    ["an unknown migration", ["get", "0000"], 4, 'error: no migration "0000" (NOT_FOUND)'],
    ["cancel of an unknown migration", ["cancel", "0000"], 4, 'error: no migration "0000" (NOT_FOUND)'],
    ["an unknown VM by name", ["vm", "nope"], 4, "(NOT_FOUND)"],
    ["a missing command", [], 2, "expected one command"],
  ])("ballastctl reports %s clearly", async (_n, args, code, text) => {
    const r = await runCtl(["--server", co.address, ...args]);
    expect(r.code).toBe(code);
    expect(r.stdout + r.stderr).toContain(text);
    expectNoGrpcInternals(r.stderr);
  });

  it("ballastctl reports a coordinator it cannot reach as UNAVAILABLE", async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const r = await runCtl(["--server", address, "vms"]);
    expect(r.code).toBe(7);
    expect(r.stderr).toMatch(new RegExp(`^error: cannot reach the coordinator at ${address.replace(/\./g, "\\.")}: .*ECONNREFUSED.* \\(UNAVAILABLE\\)\\n$`));
    expectNoGrpcInternals(r.stderr);
  });
});

/** grpc-js's own wording must not reach the operator. */
function expectNoGrpcInternals(text: string) {
  expect(text).not.toMatch(/\b\d{1,2} [A-Z_]+: /);
  expect(text).not.toContain("Resolution note");
  expect(text).not.toMatch(/MIGRATION_MODE_|BALLOON_STRATEGY_/);
}

describe("ballastctl refusals with a live source VM (bare QEMU)", () => {
  let qdir = "";
  let src: BareQemu;
  let dst: BareQemu;
  let srcCo: CoordinatorProcess;
  let dstCo: CoordinatorProcess;

  beforeAll(async () => {
    qdir = mkdtempSync(join(tmpdir(), "ballast-api-qemu-"));
    src = await startBareQemu({ name: "src", dir: qdir });
    // Not started with -incoming defer: the destination must refuse PrepareIncoming.
    dst = await startBareQemu({ name: "dst", dir: qdir });
    srcCo = await startCoordinatorProcess(qdir, "src", { hostId: "src-host", listen: "127.0.0.1:0", vms: [{ name: "vm1", qmpSocket: src.qmp }] });
    dstCo = await startCoordinatorProcess(qdir, "dst", { hostId: "dst-host", listen: "127.0.0.1:0", vms: [{ name: "vm1", qmpSocket: dst.qmp }] });
    for (const c of [srcCo, dstCo]) {
      const client = createClient(VmService, c.address);
      try {
        await waitForVm(client, "vm1", (v) => v.qmpConnected && v.runState === "running", `QMP of ${c.address}`, 30_000);
      } finally {
        client.close();
      }
    }
  });

  afterAll(async () => {
    await Promise.all([srcCo?.stop(), dstCo?.stop()]);
    await Promise.all([src?.stop(), dst?.stop()]);
    if (qdir) rmSync(qdir, { recursive: true, force: true });
  });

  it("UNAVAILABLE (7) when the destination coordinator is down, naming it, without grpc-js internals", async () => {
    const down = `127.0.0.1:${await freePort()}`;
    const r = await runCtl(["--server", srcCo.address, "migrate", "vm1", "--to", down, "--strategy", "none"]);
    expect(r.code).toBe(7);
    expect(r.stderr).toMatch(new RegExp(`^error: migration \\S+ of vm1 refused before anything moved: destination ${down.replace(/\./g, "\\.")} is not ready: .*ECONNREFUSED.* \\(UNAVAILABLE\\)\\n$`));
    // The record stays, FAILED, and says the same.
    expect(r.stdout).toMatch(new RegExp(`of vm1 to ${down.replace(/\./g, "\\.")}: FAILED \\(destination `));
    expectNoGrpcInternals(r.stdout + r.stderr);
  });

  it("FAILED_PRECONDITION (8) when the destination QEMU was not started with -incoming defer", async () => {
    const r = await runCtl(["--server", srcCo.address, "migrate", "vm1", "--to", dstCo.address, "--strategy", "none"]);
    expect(r.code).toBe(8);
    expect(r.stderr).toMatch(/^error: migration \S+ of vm1 refused before anything moved: destination \S+ is not ready: VM vm1 here is running; the destination QEMU must be started with -incoming defer \(FAILED_PRECONDITION\)\n$/);
    expectNoGrpcInternals(r.stdout + r.stderr);
  });

  it.each([["its own address", (a: string) => a], ["localhost", (a: string) => a.replace("127.0.0.1", "localhost")]])(
    "INVALID_ARGUMENT (5) for --to this coordinator itself, reached by %s; no migration is created",
    async (_n, to) => {
      const target = to(srcCo.address);
      const before = await runCtl(["--server", srcCo.address, "--json", "list"]);
      const r = await runCtl(["--server", srcCo.address, "migrate", "vm1", "--to", target]);
      expect(r.code).toBe(5);
      expect(r.stderr).toBe(`error: --to ${target} is this coordinator itself; name the destination host's coordinator (INVALID_ARGUMENT, field destination)\n`);
      const after = await runCtl(["--server", srcCo.address, "--json", "list"]);
      expect(JSON.parse(after.stdout)).toHaveLength(JSON.parse(before.stdout).length);
    },
  );

  it("the refused migrations left the source VM running, and its records FAILED with the cause", async () => {
    const client = createClient(VmService, srcCo.address);
    try {
      const vm = (await client.getVm({ name: "vm1" })).vm;
      expect(vm?.runState).toBe("running");
      expect(vm?.migrationId).toBe("");
    } finally {
      client.close();
    }
    const list = await runCtl(["--server", srcCo.address, "--json", "list"]);
    const records = JSON.parse(list.stdout) as Array<{ phase: string; error: string }>;
    expect(records.map((m) => m.phase)).toEqual(["PHASE_FAILED", "PHASE_FAILED"]);
    expect(records.map((m) => m.error).join("\n")).toMatch(/-incoming defer \(FAILED_PRECONDITION\)[^]*ECONNREFUSED.* \(UNAVAILABLE\)/);
  });
});
