/**
 * Thin gRPC handlers: validate, call into the domain, map the result.
 * Status codes are chosen only in grpc-errors.ts.
 */
import { randomUUID } from "node:crypto";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { AgentService, SessionResponseSchema } from "../gen/ballast/v1/agent_pb.js";
import { MigrationStatsSchema } from "../gen/ballast/v1/common_pb.js";
import type { MigrationService } from "../gen/ballast/v1/migration_pb.js";
import { PeerService } from "../gen/ballast/v1/peer_pb.js";
import { VmSchema, type Vm, type VmService } from "../gen/ballast/v1/vm_pb.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../shared/errors.js";
import { createClient, type ServiceImpl } from "../shared/grpc-adapter.js";
import { toU64 } from "../shared/units.js";
import type { AgentHub } from "./agent-hub.js";
import type { MigrationDefaults } from "./config.js";
import { isFinal, recordToProto, statsToProto, type MigrationRecord } from "./migration-record.js";
import type { MigrationStore } from "./migration-store.js";
import { requireId, validateMigrateRequest } from "./validate.js";
import type { VmSupervisor } from "./vm-supervisor.js";
import { sleep } from "../shared/retry.js";

/** Everything the handlers call into. */
export interface Domain {
  vms: ReadonlyMap<string, VmSupervisor>;
  hub: AgentHub;
  store: MigrationStore;
  defaults: MigrationDefaults;
}

function isKnown(store: MigrationStore, id: string): boolean {
  try {
    store.get(id);
    return true;
  } catch {
    return false;
  }
}

/** The named VM's supervisor, or NotFoundError. */
export function findVm(domain: Domain, name: string): VmSupervisor {
  const vm = domain.vms.get(name);
  if (!vm) throw new NotFoundError(`no VM named ${JSON.stringify(name)} on this host`);
  return vm;
}

/** Streams snapshots of a migration until it is final or the caller goes away. Coalesces bursts to at most one per `minGapMs`. */
async function streamRecord(domain: Domain, id: string, signal: AbortSignal, send: (r: MigrationRecord) => Promise<void>, minGapMs = 200): Promise<void> {
  let record = domain.store.get(id);
  let dirty = true;
  let wake: () => void = () => {};
  const onUpdate = (r: MigrationRecord) => {
    if (r.id !== id) return;
    record = r;
    dirty = true;
    wake();
  };
  domain.store.on("update", onUpdate);
  const onAbort = () => wake();
  signal.addEventListener("abort", onAbort);
  try {
    for (;;) {
      if (signal.aborted) return;
      if (dirty) {
        dirty = false;
        await send(record);
        if (isFinal(record)) return;
        await sleep(minGapMs);
        continue;
      }
      await new Promise<void>((r) => (wake = r));
    }
  } finally {
    domain.store.off("update", onUpdate);
    signal.removeEventListener("abort", onAbort);
  }
}

/** This coordinator's id for GetPeerInfo: random, one per Domain (one per running coordinator). */
const coordinatorIds = new WeakMap<Domain, string>();
function coordinatorId(domain: Domain): string {
  let id = coordinatorIds.get(domain);
  if (id === undefined) {
    id = randomUUID();
    coordinatorIds.set(domain, id);
  }
  return id;
}

/** How long the self-migration check waits for the destination's answer. */
const PEER_INFO_DEADLINE_MS = 3000;

/**
 * Refuses a migration to this coordinator itself. Addresses cannot tell
 * (0.0.0.0, localhost, a host name, a forwarded port all reach the same
 * process), so the source asks the destination for its coordinator id and
 * compares it with its own. A destination that cannot be asked (down, or
 * an older coordinator without GetPeerInfo) is not refused here: PREPARE
 * reaches it again and the migration record says why it failed.
 */
async function refuseSelfMigration(domain: Domain, destination: string, signal: AbortSignal): Promise<void> {
  const peer = createClient(PeerService, destination);
  let theirs: string;
  try {
    theirs = (await peer.getPeerInfo({}, { deadlineMs: PEER_INFO_DEADLINE_MS, signal })).coordinatorId;
  } catch {
    return;
  } finally {
    peer.close();
  }
  if (theirs === coordinatorId(domain)) {
    throw InvalidArgumentError.field("destination", `--to ${destination} is this coordinator itself; name the destination host's coordinator`);
  }
}

/** MigrationService for control planes. */
export function migrationService(domain: Domain): ServiceImpl<typeof MigrationService> {
  return {
    async migrate(req, ctx) {
      const params = validateMigrateRequest(req, domain.defaults);
      const vm = findVm(domain, params.vm);
      await refuseSelfMigration(domain, params.destination, ctx.signal);
      const record = vm.startOutgoing(params, randomUUID());
      await streamRecord(domain, record.id, ctx.signal, (r) => ctx.send({ migration: recordToProto(r) }));
    },
    async watchMigration(req, ctx) {
      const id = requireId(req.id);
      domain.store.get(id);
      await streamRecord(domain, id, ctx.signal, (r) => ctx.send({ migration: recordToProto(r) }));
    },
    async getMigration(req) {
      return { migration: recordToProto(domain.store.get(requireId(req.id))) };
    },
    async listMigrations(req) {
      return { migrations: domain.store.list(req.vm || undefined).map(recordToProto) };
    },
    async cancelMigration(req) {
      const id = requireId(req.id);
      const record = domain.store.get(id);
      const done = await findVm(domain, record.vm).cancel(id);
      return { migration: recordToProto(done) };
    },
  };
}

/** Builds the wire view of one VM. */
export function vmToProto(vm: VmSupervisor): Vm {
  const v = vm.view();
  return create(VmSchema, {
    name: v.name,
    qmpConnected: v.connected,
    runState: v.runState,
    balloon: v.connected
      ? { targetBytes: toU64(v.balloonTargetBytes ?? v.balloonActualBytes ?? v.ramBytes), actualBytes: toU64(v.balloonActualBytes ?? 0), ramBytes: toU64(v.ramBytes) }
      : undefined,
    agentConnected: v.agentConnected,
    lastSample: v.lastSample,
    floorBytes: toU64(v.floorBytes),
    maxBytes: toU64(v.maxBytes),
    migrationId: v.migrationId,
  });
}

/** VmService for control planes. */
export function vmService(domain: Domain): ServiceImpl<typeof VmService> {
  return {
    async listVms() {
      return { vms: [...domain.vms.values()].map((vm) => vmToProto(vm)) };
    },
    async getVm(req) {
      return { vm: vmToProto(findVm(domain, requireId(req.name, "name"))) };
    },
  };
}

/** PeerService for other coordinators. */
export function peerService(domain: Domain): ServiceImpl<typeof PeerService> {
  return {
    async prepareIncoming(req) {
      const vm = requireId(req.vm, "vm");
      const id = requireId(req.migrationId, "migration_id");
      if (isKnown(domain.store, id)) throw new FailedPreconditionError(`migration ${id} is already known here`);
      return { uri: await findVm(domain, vm).prepareIncoming(id, req.mode) };
    },
    async getIncoming(req) {
      const rec = domain.store.get(requireId(req.migrationId, "migration_id"));
      if (rec.direction !== "incoming") throw new NotFoundError(`no incoming migration ${JSON.stringify(rec.id)}`);
      const v = findVm(domain, rec.vm).view();
      return {
        phase: rec.phase,
        stats: statsToProto(rec.destinationStats) ?? create(MigrationStatsSchema, {}),
        balloon: { targetBytes: toU64(v.balloonTargetBytes ?? 0), actualBytes: toU64(v.balloonActualBytes ?? 0), ramBytes: toU64(v.ramBytes) },
      };
    },
    async recoverIncoming(req) {
      const rec = domain.store.get(requireId(req.migrationId, "migration_id"));
      if (rec.direction !== "incoming") throw new NotFoundError(`no incoming migration ${JSON.stringify(rec.id)}`);
      return { uri: await findVm(domain, rec.vm).recoverIncoming(rec.id) };
    },
    async getPeerInfo() {
      return { coordinatorId: coordinatorId(domain) };
    },
  };
}

/** AgentService; `bound` pins the session to one VM (its dedicated port). */
export function agentService(domain: Domain, bound?: VmSupervisor): ServiceImpl<typeof AgentService> {
  return {
    session: (ctx) => domain.hub.serve(ctx as Parameters<AgentHub["serve"]>[0], bound),
  };
}

export type { SessionResponseSchema, MessageInitShape };
