/**
 * Thin gRPC handlers: validate, call into the domain, map the result.
 * Status codes are chosen only in grpc-errors.ts.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { AgentService, SessionResponseSchema } from "../gen/ballast/v1/agent_pb.js";
import { MigrationStatsSchema } from "../gen/ballast/v1/common_pb.js";
import type { MigrationService } from "../gen/ballast/v1/migration_pb.js";
import type { PeerService } from "../gen/ballast/v1/peer_pb.js";
import { VmSchema, type Vm, type VmService } from "../gen/ballast/v1/vm_pb.js";
import { NotFoundError } from "../shared/errors.js";
import type { ServiceImpl } from "../shared/grpc-adapter.js";
import { toU64 } from "../shared/units.js";
import type { AgentHub } from "./agent-hub.js";
import type { MigrationDefaults } from "./config.js";
import type { IncomingManager } from "./incoming.js";
import { isFinal, recordToProto, statsToProto, type MigrationRecord } from "./migration-record.js";
import type { MigrationOrchestrator } from "./migration-orchestrator.js";
import type { MigrationStore } from "./migration-store.js";
import { requireId, validateMigrateRequest } from "./validate.js";
import type { VmRuntime } from "./vm-runtime.js";

/** Everything the handlers call into. */
export interface Domain {
  vms: ReadonlyMap<string, VmRuntime>;
  hub: AgentHub;
  store: MigrationStore;
  orchestrator: MigrationOrchestrator;
  incoming: IncomingManager;
  defaults: MigrationDefaults;
}

/** Streams snapshots of a migration until it is final or the caller goes away. Coalesces bursts to at most one per `minGapMs`. */
async function streamRecord(domain: Domain, id: string, signal: AbortSignal, send: (r: MigrationRecord) => Promise<void>, minGapMs = 200): Promise<void> {
  const record = domain.store.get(id);
  let dirty = true;
  let wake: () => void = () => {};
  const onUpdate = (r: MigrationRecord) => {
    if (r.id !== id) return;
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
        await new Promise((r) => setTimeout(r, minGapMs));
        continue;
      }
      await new Promise<void>((r) => (wake = r));
    }
  } finally {
    domain.store.off("update", onUpdate);
    signal.removeEventListener("abort", onAbort);
  }
}

/** MigrationService for control planes. */
export function migrationService(domain: Domain): ServiceImpl<typeof MigrationService> {
  return {
    async migrate(req, ctx) {
      const params = validateMigrateRequest(req, domain.defaults);
      const record = domain.orchestrator.start(params);
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
      await domain.orchestrator.cancel(id);
      const done = await domain.orchestrator.whenDone(id);
      return { migration: recordToProto(done) };
    },
  };
}

/** Builds the wire view of one VM. */
export function vmToProto(vm: VmRuntime, hub: AgentHub): Vm {
  const b = vm.balloon;
  return create(VmSchema, {
    name: vm.config.name,
    qmpConnected: vm.qmpConnected,
    runState: vm.runState,
    balloon: { targetBytes: toU64(b?.targetBytes ?? vm.ramBytes), actualBytes: toU64(b?.actualBytes ?? 0), ramBytes: toU64(vm.ramBytes) },
    agentConnected: hub.session(vm.config.name) !== undefined,
    lastSample: vm.lastSample,
    floorBytes: toU64(b ? b.clamp(0) : vm.config.floorBytes),
    maxBytes: toU64(b ? b.clamp(Number.MAX_SAFE_INTEGER) : vm.config.maxBytes),
    migrationId: vm.migration && !isFinal(vm.migration) ? vm.migration.id : "",
  });
}

/** VmService for control planes. */
export function vmService(domain: Domain): ServiceImpl<typeof VmService> {
  return {
    async listVms() {
      return { vms: [...domain.vms.values()].map((vm) => vmToProto(vm, domain.hub)) };
    },
    async getVm(req) {
      const name = requireId(req.name, "name");
      const vm = domain.vms.get(name);
      if (!vm) throw new NotFoundError(`no VM named ${JSON.stringify(name)} on this host`);
      return { vm: vmToProto(vm, domain.hub) };
    },
  };
}

/** PeerService for other coordinators. */
export function peerService(domain: Domain): ServiceImpl<typeof PeerService> {
  return {
    async prepareIncoming(req) {
      const vm = requireId(req.vm, "vm");
      const id = requireId(req.migrationId, "migration_id");
      return { uri: await domain.incoming.prepare(vm, id, req.mode) };
    },
    async getIncoming(req) {
      const rec = domain.incoming.get(requireId(req.migrationId, "migration_id"));
      const vm = domain.vms.get(rec.vm);
      const b = vm?.balloon;
      return {
        phase: rec.phase,
        stats: statsToProto(rec.stats) ?? create(MigrationStatsSchema, {}),
        balloon: { targetBytes: toU64(b?.targetBytes ?? 0), actualBytes: toU64(b?.actualBytes ?? 0), ramBytes: toU64(vm?.ramBytes ?? 0) },
      };
    },
  };
}

/** AgentService; `bound` pins the session to one VM (its dedicated port). */
export function agentService(domain: Domain, bound?: VmRuntime): ServiceImpl<typeof AgentService> {
  return {
    session: (ctx) => domain.hub.serve(ctx as Parameters<AgentHub["serve"]>[0], bound),
  };
}

export type { SessionResponseSchema, MessageInitShape };
