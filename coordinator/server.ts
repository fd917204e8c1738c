/**
 * The coordinator's composition root: builds the domain objects from the
 * config, and serves them over gRPC with health and reflection.
 */
import * as grpc from "@grpc/grpc-js";
import { HealthImplementation } from "grpc-health-check";
import { AgentService } from "../gen/ballast/v1/agent_pb.js";
import { MigrationService } from "../gen/ballast/v1/migration_pb.js";
import { PeerService } from "../gen/ballast/v1/peer_pb.js";
import { VmService } from "../gen/ballast/v1/vm_pb.js";
import { UnavailableError } from "../shared/errors.js";
import { addService, createClient, type Client } from "../shared/grpc-adapter.js";
import type { Logger } from "../shared/logger.js";
import { AgentChannel } from "./agent-channel.js";
import { AgentHub } from "./agent-hub.js";
import type { CoordinatorConfig } from "./config.js";
import { toGrpcStatus } from "./grpc-errors.js";
import { MigrationStore } from "./migration-store.js";
import type { HypervisorDriver } from "./hypervisor.js";
import { LibvirtDriver } from "./libvirt-driver.js";
import { QmpDriver } from "./qmp-driver.js";
import { addReflection } from "./reflection.js";
import { agentService, migrationService, peerService, vmService, type Domain } from "./services.js";
import { VmSupervisor } from "./vm-supervisor.js";

/** Server options shared by every listener: agents ping every ~2 s to notice a dead link after migration. */
export const SERVER_OPTIONS: grpc.ServerOptions = {
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.http2.min_ping_interval_without_data_ms": 1000,
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
};

/** A running coordinator. */
export interface Coordinator {
  readonly domain: Domain;
  /** The bound control-plane address (port resolved if 0 was asked). */
  readonly address: string;
  /** Bound agent addresses by VM name ("*" for the shared agent listener). */
  readonly agentAddresses: ReadonlyMap<string, string>;
  close(): Promise<void>;
}

function bind(server: grpc.Server, address: string): Promise<number> {
  return new Promise((resolve, reject) =>
    server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (err, port) =>
      err ? reject(new UnavailableError(`cannot listen on ${address}: ${err.message}`)) : resolve(port),
    ),
  );
}

/** Starts a coordinator from a validated config. */
export async function startCoordinator(config: CoordinatorConfig, logger: Logger): Promise<Coordinator> {
  const store = new MigrationStore({ stateDir: config.stateDir, logger });
  const peers = new Map<string, Client<typeof PeerService>>();
  const peer = (address: string) => {
    let c = peers.get(address);
    if (!c) {
      c = createClient(PeerService, address);
      peers.set(address, c);
    }
    return c;
  };
  const vms = new Map<string, VmSupervisor>();
  const drivers = new Map<string, HypervisorDriver>();
  for (const vc of config.vms) {
    const driver = vc.libvirt
      ? new LibvirtDriver({ uri: vc.libvirt.uri, domain: vc.libvirt.domain, dialUri: vc.libvirt.peerUri, logger })
      : new QmpDriver({ socketPath: vc.qmpSocket, agentSocket: vc.agentSocket, logger });
    drivers.set(vc.name, driver);
    vms.set(vc.name, new VmSupervisor({ config: vc, defaults: config.defaults, driver, store, peer, incomingHost: config.incomingHost, logger }));
  }
  const hub = new AgentHub({ hostId: config.hostId, vms, defaults: config.defaults, logger });
  const domain: Domain = { vms, hub, store, defaults: config.defaults };

  const main = new grpc.Server(SERVER_OPTIONS);
  addService(main, MigrationService, migrationService(domain), toGrpcStatus);
  addService(main, VmService, vmService(domain), toGrpcStatus);
  addService(main, PeerService, peerService(domain), toGrpcStatus);
  const health = new HealthImplementation({
    "": "SERVING",
    "ballast.v1.MigrationService": "SERVING",
    "ballast.v1.VmService": "SERVING",
    "ballast.v1.PeerService": "SERVING",
  });
  health.addToServer(main);
  addReflection(main);

  const servers: grpc.Server[] = [main];
  const agentAddresses = new Map<string, string>();
  const { host } = splitListen(config.listen);
  const port = await bind(main, config.listen);
  const address = `${host}:${port}`;
  try {
    if (config.agentListen) {
      const shared = new grpc.Server(SERVER_OPTIONS);
      addService(shared, AgentService, agentService(domain), toGrpcStatus);
      const p = await bind(shared, config.agentListen);
      agentAddresses.set("*", `${splitListen(config.agentListen).host}:${p}`);
      servers.push(shared);
    }
    for (const vm of vms.values()) {
      if (vm.config.agentPort === 0) continue;
      const s = new grpc.Server(SERVER_OPTIONS);
      addService(s, AgentService, agentService(domain, vm), toGrpcStatus);
      const a = `127.0.0.1:${vm.config.agentPort}`;
      await bind(s, a);
      agentAddresses.set(vm.config.name, a);
      servers.push(s);
    }
  } catch (err) {
    for (const s of servers) s.forceShutdown();
    throw err;
  }
  // The agent's virtio-serial port (coordinator/agent-channel.ts): a server per VM, bound to no port, fed by the channel.
  const channels: AgentChannel[] = [];
  const channelPaths: Record<string, string> = {};
  for (const vm of vms.values()) {
    const driver = drivers.get(vm.name);
    if (!driver?.agentChannelPath || (!vm.config.agentSocket && !vm.config.libvirt)) continue;
    const s = new grpc.Server(SERVER_OPTIONS);
    addService(s, AgentService, agentService(domain, vm), toGrpcStatus);
    channels.push(new AgentChannel({ vm, driver, server: s, logger }));
    channelPaths[vm.name] = vm.config.agentSocket ?? "(from libvirt)";
    servers.push(s);
  }
  for (const vm of vms.values()) vm.start();
  logger.info({ address, agents: Object.fromEntries(agentAddresses), agentChannels: channelPaths, vms: [...vms.keys()] }, "coordinator serving");

  return {
    domain,
    address,
    agentAddresses,
    async close() {
      for (const c of channels) c.close();
      await Promise.all(
        servers.map(
          (s) =>
            new Promise<void>((resolve) => {
              const t = setTimeout(() => {
                s.forceShutdown();
                resolve();
              }, 2000);
              s.tryShutdown(() => {
                clearTimeout(t);
                resolve();
              });
            }),
        ),
      );
      for (const c of peers.values()) c.close();
      await Promise.all([...vms.values()].map((vm) => vm.stop()));
      store.close();
    },
  };
}

function splitListen(address: string): { host: string } {
  const i = address.lastIndexOf(":");
  return { host: address.slice(0, i) };
}
