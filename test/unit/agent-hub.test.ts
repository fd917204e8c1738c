/**
 * The agent hub over real gRPC on loopback: identity checks, error statuses
 * through the adapter, and session replacement. Each VM is a real
 * VmSupervisor over a fake hypervisor driver and an in-memory migration store.
 */
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentService, type SessionResponse } from "../../gen/ballast/v1/agent_pb.js";
import { AgentHub } from "../../coordinator/agent-hub.js";
import { toGrpcStatus } from "../../coordinator/grpc-errors.js";
import { agentService, type Domain } from "../../coordinator/services.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import { VmSupervisor, type AgentLink } from "../../coordinator/vm-supervisor.js";
import type { PeerService } from "../../gen/ballast/v1/peer_pb.js";
import { addService, createClient, type Client } from "../../shared/grpc-adapter.js";
import { silentLogger } from "../../shared/logger.js";
import { FakeDriver } from "../helpers/fake-driver.js";

const logger = silentLogger();
const defaults = { maxBandwidthBytesPerSec: 1e8, downtimeLimitMs: 300, prepareDeadlineMs: 1000, steadyState: true, sampleIntervalMs: 750, agentLeaseMs: 10_000 };
const store = new MigrationStore({ stateDir: "", logger });
const noPeer = (): Client<typeof PeerService> => {
  throw new Error("no peer in this test");
};
/** Links the hub attached, per VM, in order. */
const attached = new Map<string, AgentLink[]>();
const mkVm = (name: string, agentId: string, agentPort: number, hypervisorUp = false) => {
  const vm = new VmSupervisor({
    config: { name, qmpSocket: `/nonexistent/${name}.qmp`, agentId, floorBytes: 64 << 20, maxBytes: 0, agentPort },
    defaults,
    // vm1 and vm2 have no hypervisor behind them (the driver never comes up), as before the supervisor.
    driver: new FakeDriver({ upOnStart: hypervisorUp }),
    store,
    peer: noPeer,
    incomingHost: "127.0.0.1",
    logger,
  });
  const attach = vm.attachAgent.bind(vm);
  vm.attachAgent = (link) => {
    attached.set(name, [...(attached.get(name) ?? []), link]);
    return attach(link);
  };
  return vm;
};
/** The hello of the VM's current session, if one is attached. */
const currentHello = (name: string) => (vms.get(name)?.view().agentConnected ? attached.get(name)?.at(-1)?.hello : undefined);

let server: grpc.Server;
let shared = "";
let bound = "";
const vms = new Map<string, VmSupervisor>();
let hub: AgentHub;

beforeAll(async () => {
  vms.set("vm1", mkVm("vm1", "agent-1", 0));
  vms.set("vm2", mkVm("vm2", "agent-2", 1));
  vms.set("vm3", mkVm("vm3", "agent-3", 0, true));
  for (const vm of vms.values()) vm.start();
  hub = new AgentHub({ hostId: "h1", vms, defaults, logger, helloTimeoutMs: 500 });
  const domain = { vms, hub, defaults } as unknown as Domain;
  server = new grpc.Server();
  addService(server, AgentService, agentService(domain), toGrpcStatus);
  const boundServer = new grpc.Server();
  addService(boundServer, AgentService, agentService(domain, vms.get("vm2")), toGrpcStatus);
  const bind = (s: grpc.Server) =>
    new Promise<number>((res, rej) => s.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  shared = `127.0.0.1:${await bind(server)}`;
  bound = `127.0.0.1:${await bind(boundServer)}`;
});

afterAll(async () => {
  server.forceShutdown();
  for (const vm of vms.values()) await vm.stop();
  store.close();
});

async function session(address: string, first: Parameters<ReturnType<ReturnType<typeof createClient<typeof AgentService>>["session"]>["send"]>[0] | undefined) {
  const client = createClient(AgentService, address);
  const stream = client.session();
  if (first) await stream.send(first);
  const got: SessionResponse[] = [];
  const done = (async () => {
    try {
      for await (const m of stream) got.push(m);
      return undefined;
    } catch (err) {
      return err as grpc.ServiceError;
    }
  })();
  return { client, stream, got, done };
}

describe("AgentHub sessions", () => {
  it.each([
    ["a first message that is not hello", () => shared, { msg: { case: "phaseAck" as const, value: {} } }, grpc.status.INVALID_ARGUMENT, "first session message must be hello"],
    ["an empty vm id", () => shared, { msg: { case: "hello" as const, value: { vmId: "" } } }, grpc.status.INVALID_ARGUMENT, "vm_id is empty"],
    ["an unknown agent id", () => shared, { msg: { case: "hello" as const, value: { vmId: "nobody" } } }, grpc.status.NOT_FOUND, "no VM with agent id"],
    ["another VM's id on a bound port", () => bound, { msg: { case: "hello" as const, value: { vmId: "agent-1" } } }, grpc.status.PERMISSION_DENIED, "claims to be"],
    ["a bound VM's id on the shared port", () => shared, { msg: { case: "hello" as const, value: { vmId: "agent-2" } } }, grpc.status.PERMISSION_DENIED, "must attach on its own agent port"],
    ["silence instead of hello", () => shared, undefined, grpc.status.INVALID_ARGUMENT, "no hello within"],
  ])("refuses %s", async (_n, address, first, code, text) => {
    const s = await session(address(), first);
    const err = await s.done;
    expect(err?.code).toBe(code);
    expect(err?.details).toContain(text);
    s.client.close();
  });

  it("welcomes a valid agent with policy, then replaces it with a newer session", async () => {
    const a = await session(bound, { msg: { case: "hello", value: { vmId: "agent-2", agentVersion: "t" } } });
    const until = Date.now() + 5000;
    while (a.got.length < 2 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(a.got[0]?.msg.case).toBe("welcome");
    expect(a.got[0]?.msg.value).toMatchObject({ vmName: "vm2", hostId: "h1" });
    expect(a.got[1]?.msg.case).toBe("policy");
    expect(a.got[1]?.msg.value).toMatchObject({ sampleIntervalMs: 750, steadyState: true, floorBytes: BigInt(64 << 20) });
    expect(currentHello("vm2")?.agentVersion).toBe("t");
    expect(hub.size).toBe(1);

    const b = await session(bound, { msg: { case: "hello", value: { vmId: "agent-2", agentVersion: "t2" } } });
    // The older stream ends cleanly once the new one is attached.
    expect(await a.done).toBeUndefined();
    expect(currentHello("vm2")?.agentVersion).toBe("t2");
    expect(attached.get("vm2")).toHaveLength(2);

    // A sample that contradicts itself is refused and not stored.
    await b.stream.send({ msg: { case: "sample", value: { memTotalBytes: 100n, memFreeBytes: 200n } } });
    await b.stream.send({ msg: { case: "sample", value: { memTotalBytes: 1000n, memFreeBytes: 200n, memAvailableBytes: 300n } } });
    const until2 = Date.now() + 5000;
    while (!vms.get("vm2")?.view().lastSample && Date.now() < until2) await new Promise((r) => setTimeout(r, 20));
    expect(vms.get("vm2")?.view().lastSample?.memTotalBytes).toBe(1000n);
    b.stream.end();
    await b.done;
    a.client.close();
    b.client.close();
  });

  // The hub attaches the link only after Welcome and Policy: attachAgent pushes the balloon state at once.
  it("sends Welcome before anything else also when the VM's hypervisor is up", async () => {
    const s = await session(shared, { msg: { case: "hello", value: { vmId: "agent-3", agentVersion: "t3" } } });
    const until = Date.now() + 5000;
    while (s.got.length < 3 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    try {
      expect(s.got.map((m) => m.msg.case).slice(0, 2)).toEqual(["welcome", "policy"]);
    } finally {
      s.stream.end();
      await s.done;
      s.client.close();
    }
  });
});

describe("AgentHub limits", () => {
  let limited: AgentHub;
  let server2: grpc.Server;
  let address = "";
  beforeAll(async () => {
    limited = new AgentHub({ hostId: "h2", vms, defaults, logger, helloTimeoutMs: 700, maxAwaitingHello: 3, messagesPerSecond: 5 });
    server2 = new grpc.Server();
    addService(server2, AgentService, agentService({ vms, hub: limited, defaults } as unknown as Domain), toGrpcStatus);
    address = await new Promise<string>((res, rej) =>
      server2.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(`127.0.0.1:${p}`))),
    );
  });
  afterAll(() => server2.forceShutdown());

  it("refuses sessions beyond the cap of those that have not said hello, and admits again once they time out", async () => {
    const silent = await Promise.all([0, 1, 2].map(() => session(address, undefined)));
    await new Promise((r) => setTimeout(r, 100));
    const t0 = Date.now();
    const extra = await session(address, undefined);
    const err = await extra.done;
    expect(err?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(Date.now() - t0).toBeLessThan(500);
    for (const s of silent) expect((await s.done)?.code).toBe(grpc.status.INVALID_ARGUMENT);
    const later = await session(address, { msg: { case: "hello", value: { vmId: "agent-1", agentVersion: "late" } } });
    const until = Date.now() + 3000;
    while (later.got.length < 1 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(later.got[0]?.msg.case).toBe("welcome");
    later.stream.end();
    await later.done;
    for (const s of [...silent, extra, later]) s.client.close();
  });

  it("drops messages beyond the per-session budget and ends a session that floods", async () => {
    const before = limited.detachedCount;
    const s = await session(address, { msg: { case: "hello", value: { vmId: "agent-1", agentVersion: "flood" } } });
    const sample = { msg: { case: "sample" as const, value: { memTotalBytes: 1000n, memFreeBytes: 200n, memAvailableBytes: 300n } } };
    for (let i = 0; i < 400; i++) void s.stream.send(sample).catch(() => {});
    const until = Date.now() + 5000;
    while (limited.detachedCount === before && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(limited.detachedCount).toBe(before + 1);
    await s.done;
    s.client.close();
  });
});
