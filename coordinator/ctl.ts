/**
 * `ballastctl`: the operator's CLI for a coordinator's control-plane API.
 * Human output by default (a live progress line on a TTY), `--json` for scripts.
 */
import { toJson } from "@bufbuild/protobuf";
import { parseArgs } from "node:util";
import { status } from "@grpc/grpc-js";
import { BalloonStrategy, MigrationMode, Phase } from "../gen/ballast/v1/common_pb.js";
import { MigrationSchema, MigrationService, type Migration } from "../gen/ballast/v1/migration_pb.js";
import { VmSchema, VmService } from "../gen/ballast/v1/vm_pb.js";
import { errorMessage } from "../shared/errors.js";
import { createClient } from "../shared/grpc-adapter.js";
import { parseSize } from "../shared/units.js";
import { cleanGrpcMessage, codeOfReason, decodeStatusDetails, statusName } from "./grpc-errors.js";
import { renderProgress, summarize } from "./progress.js";

const USAGE = `usage: ballastctl [--server HOST:PORT] [--json] COMMAND

commands:
  migrate VM --to HOST:PORT [--mode precopy|postcopy|hybrid]
             [--strategy inflate|overlap|steady|none] [--bandwidth RATE]
             [--downtime-ms N] [--prepare-deadline-ms N] [--postcopy-after N]
  watch ID          follow a migration until it ends
  get ID            show one migration
  list [--vm VM]    list migrations, newest first
  cancel ID         cancel a migration (the balloon is restored)
  vms               list VMs on this host
  vm NAME           show one VM

--server defaults to $BALLAST_SERVER or 127.0.0.1:50050.
--bandwidth is bytes per second: 125MB = 125*10^6 (1 Gbit/s), 100MiB = 100*2^20.
Exit codes: 0 ok / migration completed; 1 migration failed or cancelled
after it started moving; 2 usage error; a refusal (also a migration that
failed before anything moved): 4 NOT_FOUND, 5 INVALID_ARGUMENT,
6 PERMISSION_DENIED, 7 UNAVAILABLE, 8 FAILED_PRECONDITION, 3 any other.`;

/** Exit codes for refusals, by gRPC status; anything else is 3. */
const REFUSAL_EXIT: Partial<Record<status, number>> = {
  [status.NOT_FOUND]: 4,
  [status.INVALID_ARGUMENT]: 5,
  [status.PERMISSION_DENIED]: 6,
  [status.UNAVAILABLE]: 7,
  [status.FAILED_PRECONDITION]: 8,
};
const OTHER_REFUSAL_EXIT = 3;

/** A refusal to report as `error: <message> (<CODE>[, field <field>])` and exit with its code. */
class Refusal extends Error {
  constructor(
    message: string,
    readonly code: status | undefined,
    readonly field?: string,
  ) {
    super(message);
  }
  get exitCode(): number {
    return (this.code !== undefined ? REFUSAL_EXIT[this.code] : undefined) ?? OTHER_REFUSAL_EXIT;
  }
  line(): string {
    const tag = [this.code !== undefined ? statusName(this.code) : "UNKNOWN", ...(this.field ? [`field ${this.field}`] : [])].join(", ");
    return `error: ${this.message} (${tag})`;
  }
}

/** Turns a failed call into a Refusal: the coordinator's google.rpc details if it sent them, else grpc-js's own status, cleaned. */
function refusalOf(err: unknown, server: string): Refusal {
  if (err instanceof Refusal) return err;
  const e = err as { code?: unknown; details?: unknown; metadata?: unknown };
  if (typeof e?.code !== "number") return new Refusal(errorMessage(err), undefined);
  const code = e.code as status;
  const d = decodeStatusDetails(e.metadata as Parameters<typeof decodeStatusDetails>[0]);
  if (d) return new Refusal(d.status.message, code, d.badRequest?.fieldViolations.map((v) => v.field).join(", ") || undefined);
  // No details: grpc-js itself ended the call (no connection, deadline) or a non-Ballast server answered.
  const text = cleanGrpcMessage(typeof e.details === "string" && e.details ? e.details : errorMessage(err));
  if (code === status.UNAVAILABLE || code === status.DEADLINE_EXCEEDED) return new Refusal(`cannot reach the coordinator at ${server}: ${text}`, code);
  return new Refusal(text, code);
}

/** Phases in which QEMU is moving (or has moved) memory. */
const MOVING: ReadonlySet<Phase> = new Set([Phase.PRECOPY_PASS, Phase.SWITCHOVER, Phase.POSTCOPY_ACTIVE]);

/** The reason a failed record's error ends its cause with, e.g. "... (UNAVAILABLE)" (written by the coordinator's describeError). */
const RECORD_REASON = / \(([A-Z][A-Z0-9_]*)\)(?=;|$)/;

/**
 * A FAILED migration that moved nothing and whose error names the cause's
 * reason was refused before it started: ballastctl reports it like a
 * refused call (the record stays, and its summary is printed too).
 */
function recordRefusal(m: Migration): Refusal | undefined {
  if (m.phase !== Phase.FAILED) return undefined;
  if (m.transferredBytes > 0n || m.phases.some((p) => MOVING.has(p.phase))) return undefined;
  const hit = RECORD_REASON.exec(m.error);
  const code = hit ? codeOfReason(hit[1] as string) : undefined;
  if (!hit || code === undefined) return undefined;
  const message = `${m.error.slice(0, hit.index)}${m.error.slice(hit.index + hit[0].length)}`;
  return new Refusal(`migration ${m.id} of ${m.vm} refused before anything moved: ${message}`, code);
}

const MODES: Record<string, MigrationMode> = { precopy: MigrationMode.PRECOPY, postcopy: MigrationMode.POSTCOPY, hybrid: MigrationMode.HYBRID };
const STRATEGIES: Record<string, BalloonStrategy> = {
  inflate: BalloonStrategy.INFLATE_THEN_MIGRATE,
  overlap: BalloonStrategy.OVERLAP,
  steady: BalloonStrategy.STEADY_STATE,
  none: BalloonStrategy.NONE,
};

class UsageError extends Error {}

const DEFAULT_SERVER = "127.0.0.1:50050";

/** The coordinator this run talks to, for messages about reaching it. */
let activeServer = DEFAULT_SERVER;

function intArg(v: string | undefined, name: string): number {
  if (v === undefined) return 0;
  const n = Number(v);
  // The request fields are uint32.
  if (!/^\s*\d+\s*$/.test(v) || !Number.isInteger(n) || n < 0 || n > 0xffff_ffff) throw new UsageError(`--${name}: expected a non-negative integer, got ${JSON.stringify(v)}`);
  return n;
}

function pick<T>(table: Record<string, T>, v: string | undefined, name: string, fallback: T): T {
  if (v === undefined) return fallback;
  const t = table[v];
  if (t === undefined) throw new UsageError(`--${name}: expected one of ${Object.keys(table).join(", ")}, got ${JSON.stringify(v)}`);
  return t;
}

async function follow(stream: AsyncIterable<{ migration?: Migration }>, json: boolean): Promise<number> {
  const tty = process.stdout.isTTY === true && !json;
  let last: Migration | undefined;
  let lastPhase = -1;
  for await (const msg of stream) {
    if (!msg.migration) continue;
    last = msg.migration;
    if (json) continue;
    if (tty) process.stdout.write(`\r\x1b[2K${renderProgress(last, process.stdout.columns ?? 100)}`);
    else if (last.phase !== lastPhase) {
      process.stdout.write(`${renderProgress(last, 200)}\n`);
      lastPhase = last.phase;
    }
  }
  if (tty) process.stdout.write("\n");
  if (!last) throw new Error("the coordinator closed the stream without a migration snapshot");
  if (json) process.stdout.write(`${JSON.stringify(toJson(MigrationSchema, last))}\n`);
  else process.stdout.write(`${summarize(last)}\n`);
  if (last.phase === Phase.COMPLETED) return 0;
  const refused = recordRefusal(last);
  if (refused) {
    process.stderr.write(`${refused.line()}\n`);
    return refused.exitCode;
  }
  return 1;
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      server: { type: "string" },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
      to: { type: "string" },
      mode: { type: "string" },
      strategy: { type: "string" },
      bandwidth: { type: "string" },
      "downtime-ms": { type: "string" },
      "prepare-deadline-ms": { type: "string" },
      "postcopy-after": { type: "string" },
      vm: { type: "string" },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [cmd, arg, ...extra] = positionals;
  if (!cmd || extra.length > 0) throw new UsageError("expected one command");
  const server = values.server ?? process.env.BALLAST_SERVER ?? DEFAULT_SERVER;
  activeServer = server;
  const json = values.json === true;
  const out = (obj: unknown) => process.stdout.write(`${JSON.stringify(obj, null, json ? 0 : 2)}\n`);
  const needArg = (what: string) => {
    if (!arg) throw new UsageError(`${cmd}: missing ${what}`);
    return arg;
  };

  const migrations = createClient(MigrationService, server);
  const vms = createClient(VmService, server);
  try {
    switch (cmd) {
      case "migrate": {
        const vm = needArg("VM name");
        if (!values.to) throw new UsageError("migrate: --to HOST:PORT (the destination coordinator) is required");
        let bandwidth = 0;
        if (values.bandwidth !== undefined) {
          try {
            bandwidth = parseSize(values.bandwidth);
          } catch (err) {
            throw new UsageError(`--bandwidth: ${errorMessage(err)}`);
          }
        }
        const stream = migrations.migrate({
          vm,
          destination: values.to,
          mode: pick(MODES, values.mode, "mode", MigrationMode.PRECOPY),
          balloonStrategy: pick(STRATEGIES, values.strategy, "strategy", BalloonStrategy.UNSPECIFIED),
          maxBandwidthBytesPerSec: BigInt(bandwidth),
          downtimeLimitMs: intArg(values["downtime-ms"], "downtime-ms"),
          prepareDeadlineMs: intArg(values["prepare-deadline-ms"], "prepare-deadline-ms"),
          postcopyAfterPasses: intArg(values["postcopy-after"], "postcopy-after"),
        });
        return await follow(stream, json);
      }
      case "watch":
        return await follow(migrations.watchMigration({ id: needArg("migration id") }), json);
      case "get": {
        const res = await migrations.getMigration({ id: needArg("migration id") });
        if (!res.migration) throw new Error("empty answer");
        if (json) out(toJson(MigrationSchema, res.migration));
        else process.stdout.write(`${summarize(res.migration)}\n`);
        return 0;
      }
      case "list": {
        const res = await migrations.listMigrations({ vm: values.vm ?? "" });
        if (json) out(res.migrations.map((m) => toJson(MigrationSchema, m)));
        else for (const m of res.migrations) process.stdout.write(`${m.id}  ${m.vm}  ${Phase[m.phase]}  ${new Date(Number(m.createdUnixMs)).toISOString()}\n`);
        return 0;
      }
      case "cancel": {
        const res = await migrations.cancelMigration({ id: needArg("migration id") });
        if (!res.migration) throw new Error("empty answer");
        if (json) out(toJson(MigrationSchema, res.migration));
        else process.stdout.write(`${summarize(res.migration)}\n`);
        return 0;
      }
      case "vms": {
        const res = await vms.listVms({});
        out(res.vms.map((v) => toJson(VmSchema, v)));
        return 0;
      }
      case "vm": {
        const res = await vms.getVm({ name: needArg("VM name") });
        out(res.vm ? toJson(VmSchema, res.vm) : null);
        return 0;
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(cmd)}`);
    }
  } finally {
    migrations.close();
    vms.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof UsageError || (err as { code?: string }).code?.startsWith?.("ERR_PARSE_ARGS")) {
      process.stderr.write(`ballastctl: ${errorMessage(err)}\n\n${USAGE}\n`);
      process.exit(2);
    }
    const refusal = refusalOf(err, activeServer);
    process.stderr.write(`${refusal.line()}\n`);
    process.exit(refusal.exitCode);
  },
);
