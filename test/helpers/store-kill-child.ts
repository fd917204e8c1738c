/**
 * Child process for the kill -9 durability test (test/unit/migration-store.test.ts).
 *
 *   node --import tsx test/helpers/store-kill-child.ts STATE_DIR ID
 *
 * Opens the store, appends a created and a phase event, writes "acked" to
 * stdout (synchronously) once `append` has returned, then spins forever
 * without yielding to the event loop: any write the store deferred to a
 * timer or a microtask would never run before the parent's SIGKILL.
 *
 * The store must stay reachable while spinning: better-sqlite3 closes a
 * garbage-collected connection (checkpointing and removing the WAL), and an
 * optimised spin loop would otherwise let V8 collect it, so the kill would
 * hit a cleanly closed file instead of an open one.
 */
import { writeSync } from "node:fs";
import { BalloonStrategy, MigrationMode, Phase } from "../../gen/ballast/v1/common_pb.js";
import { MigrationStore } from "../../coordinator/migration-store.js";
import { silentLogger } from "../../shared/logger.js";

const [stateDir, id] = process.argv.slice(2);
if (!stateDir || !id) {
  process.stderr.write("usage: store-kill-child.ts STATE_DIR ID\n");
  process.exit(2);
}
const store = new MigrationStore({ stateDir, logger: silentLogger() });
store.create({
  type: "created",
  atMs: 1000,
  id,
  direction: "outgoing",
  params: {
    vm: "vm1",
    destination: "127.0.0.1:7000",
    mode: MigrationMode.PRECOPY,
    strategy: BalloonStrategy.INFLATE_THEN_MIGRATE,
    maxBandwidthBytesPerSec: 1e8,
    downtimeLimitMs: 300,
    prepareDeadlineMs: 1000,
    postcopyAfterPasses: 1,
  },
});
store.append(id, { type: "phase", atMs: 1001, phase: Phase.PRECOPY_PASS, pass: 3 });
writeSync(1, "acked\n");
(globalThis as { keepAlive?: unknown }).keepAlive = store;
const spinUntil = Date.now() + 60_000;
while (Date.now() < spinUntil) {
  // spin: never return to the event loop
}
process.exit(store.list().length === 1 ? 3 : 4);
