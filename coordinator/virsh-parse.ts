/**
 * Pure parsers for the `virsh` outputs the libvirt driver reads
 * (coordinator/libvirt-driver.ts), and the mapping of libvirt's domain
 * states and job statistics onto the QEMU-shaped values the coordinator
 * understands (run states, `MigrateStats`).
 *
 * Every parser is strict: a missing or malformed field throws an
 * InvalidArgumentError that names the virsh command and the field, e.g.
 * `virsh dominfo: Max memory: expected "<n> KiB", got "1 GiB"`, because a
 * silently zeroed number would corrupt the balloon and every byte count.
 * Table-tested on outputs captured from this machine's libvirt 9.0.0
 * (test/fixtures/virsh, test/unit/virsh-parse.test.ts).
 */
import { InvalidArgumentError } from "../shared/errors.js";
import type { MigrateStats } from "./qemu.js";

const KiB = 1024;

function fail(command: string, field: string, message: string): never {
  throw new InvalidArgumentError(`virsh ${command}: ${field}: ${message}`);
}

function show(v: string | undefined): string {
  return v === undefined ? "nothing" : JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}…` : v);
}

/** Splits `Key:   value` lines; indented lines without a key continue the previous value (dominfo's "Messages"). */
function colonFields(text: string, command: string): Map<string, string> {
  const out = new Map<string, string>();
  let last: string | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.replace(/\s+$/, "");
    if (line.trim() === "") continue;
    const m = /^([A-Za-z][A-Za-z0-9 /()_.-]*?):\s*(.*)$/.exec(line);
    if (m && !/^\s/.test(line)) {
      const key = m[1] as string;
      if (out.has(key)) fail(command, key, "appears twice");
      out.set(key, (m[2] as string).trim());
      last = key;
    } else if (/^\s/.test(line) && last !== undefined) {
      out.set(last, `${out.get(last)}\n${line.trim()}`);
    } else {
      fail(command, "output", `unexpected line ${show(line)}`);
    }
  }
  return out;
}

function required(fields: Map<string, string>, command: string, key: string): string {
  const v = fields.get(key);
  if (v === undefined) fail(command, key, "missing");
  return v;
}

function kib(fields: Map<string, string>, command: string, key: string): number {
  const v = required(fields, command, key);
  const m = /^(\d+) KiB$/.exec(v);
  if (!m) fail(command, key, `expected "<n> KiB", got ${show(v)}`);
  const n = Number(m[1]);
  if (!Number.isSafeInteger(n * KiB)) fail(command, key, `${v} is out of range`);
  return n * KiB;
}

// ---- dominfo ------------------------------------------------------------------

/** `virsh dominfo DOMAIN`. */
export interface DomInfo {
  /** The running domain's id; undefined when inactive (`Id: -`). It changes with every start and migration. */
  id: number | undefined;
  name: string;
  uuid: string;
  /** libvirt's state name, e.g. "running", "paused", "shut off". */
  state: string;
  /** `Max memory`: the domain's RAM, bytes. */
  maxMemoryBytes: number;
  /** `Used memory`: the balloon's current size (guest memory), bytes. */
  usedMemoryBytes: number;
  persistent: boolean;
  /** `Messages` lines, e.g. "tainted: custom configuration parameters specified". */
  messages: string[];
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Parses `virsh dominfo`. */
export function parseDominfo(text: string): DomInfo {
  const c = "dominfo";
  const f = colonFields(text, c);
  const idText = required(f, c, "Id");
  let id: number | undefined;
  if (idText !== "-") {
    if (!/^\d+$/.test(idText)) fail(c, "Id", `expected a number or "-", got ${show(idText)}`);
    id = Number(idText);
  }
  const name = required(f, c, "Name");
  if (name === "") fail(c, "Name", "empty");
  const uuid = required(f, c, "UUID");
  if (!UUID_RE.test(uuid)) fail(c, "UUID", `expected a UUID, got ${show(uuid)}`);
  const state = required(f, c, "State");
  if (!DOMAIN_STATES.has(state)) fail(c, "State", `unknown state ${show(state)}`);
  const persistentText = required(f, c, "Persistent");
  if (persistentText !== "yes" && persistentText !== "no") fail(c, "Persistent", `expected yes or no, got ${show(persistentText)}`);
  const messages = (f.get("Messages") ?? "").split("\n").filter((l) => l !== "");
  return {
    id,
    name,
    uuid,
    state,
    maxMemoryBytes: kib(f, c, "Max memory"),
    usedMemoryBytes: kib(f, c, "Used memory"),
    persistent: persistentText === "yes",
    messages,
  };
}

// ---- domstate --reason ------------------------------------------------------

/** libvirt's state names as virsh prints them (virshDomainStateToString, 9.0). */
const DOMAIN_STATES: ReadonlySet<string> = new Set(["no state", "running", "idle", "paused", "in shutdown", "shut off", "crashed", "pmsuspended"]);

/** `virsh domstate --reason DOMAIN`: state and reason, e.g. paused / migrating. */
export interface DomState {
  state: string;
  reason: string;
}

/** Parses `virsh domstate --reason`, e.g. "running (booted)". */
export function parseDomstate(text: string): DomState {
  const c = "domstate --reason";
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  if (lines.length !== 1) fail(c, "output", `expected one line, got ${lines.length}: ${show(text)}`);
  const m = /^([a-z ]+?) \(([^()]+)\)$/.exec(lines[0] as string);
  if (!m) fail(c, "state", `expected "<state> (<reason>)", got ${show(lines[0])}`);
  const state = m[1] as string;
  if (!DOMAIN_STATES.has(state)) fail(c, "state", `unknown state ${show(state)}`);
  return { state, reason: m[2] as string };
}

// ---- dommemstat ---------------------------------------------------------------

/** `virsh dommemstat DOMAIN`: the balloon driver's numbers, in bytes (virsh prints KiB). */
export interface DomMemStat {
  /** `actual`: the balloon's current size (guest memory), bytes. Always present. */
  actualBytes: number;
  /** `unused` (QEMU stat-free-memory): MemFree. */
  unusedBytes: number | undefined;
  /** `available` (QEMU stat-total-memory): MemTotal as the guest sees it. Not MemAvailable. */
  availableBytes: number | undefined;
  /** `usable` (QEMU stat-available-memory): the guest's MemAvailable. */
  usableBytes: number | undefined;
  /** `disk_caches`. */
  diskCachesBytes: number | undefined;
  /** `last_update`: Unix seconds of the guest's last stats update; 0 when it never reported. */
  lastUpdateS: number;
  /** `rss`: the QEMU process's resident memory on the host. */
  rssBytes: number | undefined;
  /** Every field as printed (KiB, counters as is). */
  fields: Record<string, number>;
}

/** Fields of dommemstat that are counters or seconds, not KiB. */
const MEMSTAT_NOT_KIB = new Set(["swap_in", "swap_out", "major_fault", "minor_fault", "last_update", "hugetlb_pgalloc", "hugetlb_pgfail"]);

/** Parses `virsh dommemstat`. */
export function parseDommemstat(text: string): DomMemStat {
  const c = "dommemstat";
  const fields: Record<string, number> = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (line === "") continue;
    const m = /^([a-z_]+) (\S+)$/.exec(line);
    if (!m) fail(c, "output", `unexpected line ${show(line)}`);
    const key = m[1] as string;
    const value = m[2] as string;
    if (!/^\d+$/.test(value)) fail(c, key, `expected a non-negative integer, got ${show(value)}`);
    if (key in fields) fail(c, key, "appears twice");
    const n = Number(value);
    if (!Number.isSafeInteger(MEMSTAT_NOT_KIB.has(key) ? n : n * KiB)) fail(c, key, `${value} is out of range`);
    fields[key] = n;
  }
  if (fields.actual === undefined) fail(c, "actual", "missing");
  const bytes = (k: string) => (fields[k] === undefined ? undefined : (fields[k] as number) * KiB);
  return {
    actualBytes: (fields.actual as number) * KiB,
    unusedBytes: bytes("unused"),
    availableBytes: bytes("available"),
    usableBytes: bytes("usable"),
    diskCachesBytes: bytes("disk_caches"),
    lastUpdateS: fields.last_update ?? 0,
    rssBytes: bytes("rss"),
    fields,
  };
}

// ---- domjobinfo --rawstats and job-completed events -------------------------------

/** libvirt's virDomainJobType. */
export const JOB_TYPE = { none: 0, bounded: 1, unbounded: 2, completed: 3, failed: 4, cancelled: 5 } as const;
/** libvirt's virDomainJobOperation values the driver tells apart. */
export const JOB_OPERATION = { migrationIn: 4, migrationOut: 5 } as const;

/** Job statistics as libvirt's typed parameters (`domjobinfo --rawstats`, the job-completed event). */
export interface JobStats {
  /** virDomainJobType; see {@link JOB_TYPE}. The job-completed event carries none: it reads as completed. */
  jobType: number;
  /** Integer parameters (`time_elapsed`, `memory_processed`, ...). */
  numbers: Record<string, number>;
  /** String parameters (`errmsg`). */
  strings: Record<string, string>;
}

/** Parameters libvirt 9.0 documents as strings; every other one must be an integer. */
const STRING_PARAMS = new Set(["errmsg", "compression_cache", "disk_temp_uri"]);

function jobParams(lines: string[], command: string): Pick<JobStats, "numbers" | "strings"> {
  const numbers: Record<string, number> = {};
  const strings: Record<string, string> = {};
  for (const line of lines) {
    const m = /^([a-z][a-z0-9_.]*): ?(.*)$/.exec(line);
    if (!m) fail(command, "output", `unexpected line ${show(line)}`);
    const key = m[1] as string;
    const value = (m[2] as string).trim();
    if (key in numbers || key in strings) fail(command, key, "appears twice");
    if (STRING_PARAMS.has(key)) {
      strings[key] = value;
      continue;
    }
    if (!/^-?\d+$/.test(value)) fail(command, key, `expected an integer, got ${show(value)}`);
    const n = Number(value);
    if (!Number.isSafeInteger(n)) fail(command, key, `${value} is out of range`);
    numbers[key] = n;
  }
  return { numbers, strings };
}

/** Parses `virsh domjobinfo --rawstats` (with or without `--completed`). */
export function parseDomjobinfoRaw(text: string): JobStats {
  const c = "domjobinfo --rawstats";
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  const first = lines.shift();
  const m = first === undefined ? null : /^Job type: (\d+)$/.exec(first);
  if (!m) fail(c, "Job type", `expected "Job type: <n>" first, got ${show(first)}`);
  const jobType = Number(m[1]);
  if (jobType > JOB_TYPE.cancelled) fail(c, "Job type", `unknown job type ${jobType}`);
  return { jobType, ...jobParams(lines, c) };
}

/**
 * Parses the output of `virsh event --event job-completed`: the last
 * `event 'job-completed' for domain ...` block, or undefined when none was
 * printed. Lines after the block ("events received: 1", virsh's warnings)
 * are not part of it.
 */
export function parseJobCompletedEvent(text: string): JobStats | undefined {
  const c = "event job-completed";
  const lines = text.split("\n");
  let start = -1;
  for (let i = 0; i < lines.length; i++) if (/event 'job-completed' for domain /.test(lines[i] as string)) start = i;
  if (start < 0) return undefined;
  const body: string[] = [];
  for (const line of lines.slice(start + 1)) {
    if (!/^\t/.test(line)) break;
    body.push(line.trim());
  }
  if (body.length === 0) fail(c, "output", "the event has no parameters");
  return { jobType: JOB_TYPE.completed, ...jobParams(body, c) };
}

/**
 * Job statistics as `MigrateStats` (coordinator/qemu.ts), with the given
 * status. libvirt's names map onto QEMU's `query-migrate` fields:
 * memory_processed → ram.transferred, memory_constant → ram.duplicate,
 * memory_iteration → ram.dirty-sync-count, and so on. `downtime` is a
 * measurement only in a finished job (a running one reports libvirt's
 * expectation), so it counts only then. `precopy-bytes`, `postcopy-bytes`
 * and the destination's blocktime have no libvirt counterpart and read 0.
 */
export function jobStatsToMigrateStats(job: JobStats, status: string): MigrateStats {
  const n = (k: string) => job.numbers[k] ?? 0;
  const finished = job.jobType === JOB_TYPE.completed || job.jobType === JOB_TYPE.failed || job.jobType === JOB_TYPE.cancelled;
  return {
    status,
    totalTimeMs: n("time_elapsed"),
    downtimeMs: finished ? n("downtime") : 0,
    setupTimeMs: n("setup_time"),
    transferredBytes: n("memory_processed"),
    remainingBytes: n("memory_remaining"),
    totalBytes: n("memory_total"),
    duplicatePages: n("memory_constant"),
    normalPages: n("memory_normal"),
    normalBytes: n("memory_normal_bytes"),
    dirtySyncCount: n("memory_iteration"),
    postcopyRequests: n("memory_postcopy_requests"),
    precopyBytes: 0,
    postcopyBytes: 0,
    postcopyBlocktimeMs: 0,
    mbps: (n("memory_bps") * 8) / 1e6,
    errorDesc: job.strings.errmsg ?? "",
    raw: { source: "libvirt", jobType: job.jobType, ...job.numbers, ...job.strings },
  };
}

/** A `MigrateStats` with nothing in it (no migration known). */
export function emptyMigrateStats(status: string, errorDesc = ""): MigrateStats {
  return { ...jobStatsToMigrateStats({ jobType: JOB_TYPE.none, numbers: {}, strings: {} }, status), errorDesc };
}

// ---- states ------------------------------------------------------------------------

/** What this host knows it is doing with the domain: sending it, expecting it, or neither. */
export type MigrationRole = "outgoing" | "incoming" | "none";

/**
 * The QEMU-style run state for a libvirt domain state, or undefined when
 * the domain does not run (shut off, crashed): the driver reports that as
 * down. A pause for migration is the source's switchover when this host
 * sends the domain ("finish-migrate"), and an incoming guest otherwise
 * ("inmigrate"); a host that expects an incoming domain also sees it
 * paused "starting up" before the stream begins.
 */
export function runStateOf(s: DomState, role: MigrationRole): string | undefined {
  switch (s.state) {
    case "running":
    case "idle":
      return "running";
    case "paused":
      if (s.reason === "migrating" || s.reason === "incoming migration") return role === "outgoing" ? "finish-migrate" : "inmigrate";
      // The guest runs on the destination now; QEMU's source says postmigrate.
      if (s.reason === "post-copy") return "postmigrate";
      if (s.reason === "post-copy failed") return "postcopy-paused";
      if (s.reason === "starting up") return role === "incoming" ? "inmigrate" : "prelaunch";
      return "paused";
    case "in shutdown":
      return "shutdown";
    case "pmsuspended":
      return "suspended";
    case "no state":
      return "unknown";
    default:
      return undefined;
  }
}

/**
 * The QEMU MigrationStatus for what libvirt shows of a migration in
 * progress. Source (an outgoing job runs): pre-copy is "active", a paused
 * (post-copy) source is "postcopy-active". Destination (a host expecting
 * the domain): paused (migrating, or starting up before the stream) is "active", running (post-copy) is "postcopy-active"; a running
 * domain otherwise means the incoming migration is over ("completed").
 * Undefined when the state says nothing about a migration.
 */
export function migrationStatusOf(s: DomState, side: "source" | "destination"): string | undefined {
  if (s.reason === "post-copy failed") return "postcopy-paused";
  if (side === "source") {
    if (s.state === "paused" && s.reason === "post-copy") return "postcopy-active";
    if (s.state === "running" || s.state === "paused") return "active";
    return undefined;
  }
  if (s.state === "paused" && (s.reason === "migrating" || s.reason === "incoming migration" || s.reason === "starting up")) return "active";
  if (s.state === "running" && s.reason === "post-copy") return "postcopy-active";
  if (s.state === "running") return "completed";
  return undefined;
}

// ---- errors ---------------------------------------------------------------------------

/** What a failed virsh command says, for the driver's decisions. */
export type VirshFailure = "no-domain" | "no-daemon" | "not-running" | "other";

/**
 * virsh's stderr as one message: the `error: ` prefix of each line removed,
 * lines joined with ": ", and virsh's own noise ("One or more references
 * were leaked") dropped.
 */
export function cleanVirshError(stderr: string): string {
  return stderr
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "" && !/references were leaked after disconnect/.test(l))
    .map((l) => l.replace(/^(error: )+/, ""))
    .join(": ");
}

/** Classifies a failed virsh command by its stderr. */
export function classifyVirshError(stderr: string): VirshFailure {
  if (/failed to get domain|Domain not found|no domain with matching/i.test(stderr)) return "no-domain";
  if (/failed to connect to the hypervisor|Failed to connect socket|Cannot recv data|End of file while reading data|connection (is )?closed/i.test(stderr)) return "no-daemon";
  if (/domain is not running/i.test(stderr)) return "not-running";
  return "other";
}

// ---- the incoming URI -------------------------------------------------------------------

/** What a libvirt destination's `prepareIncoming` returns, as JSON. */
export interface LibvirtIncoming {
  /** The destination daemon's URI as the source's virsh must dial it. */
  dconnuri: string;
  /** Where the destination QEMU listens, `tcp://HOST:PORT`. */
  migrateuri: string;
}

/** Parses the JSON URI a libvirt destination returned; a clear error when it is anything else (e.g. a QMP destination's `tcp:HOST:PORT`). */
export function parseIncomingUri(uri: string): LibvirtIncoming {
  const where = "libvirt migration URI";
  let v: unknown;
  try {
    v = JSON.parse(uri);
  } catch {
    throw new InvalidArgumentError(
      `${where}: expected JSON {"dconnuri": ..., "migrateuri": ...} from a libvirt destination, got ${show(uri)} (is the destination a QMP host?)`,
    );
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) throw new InvalidArgumentError(`${where}: expected a JSON object, got ${show(uri)}`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) if (k !== "dconnuri" && k !== "migrateuri") throw new InvalidArgumentError(`${where}: unknown key ${k}`);
  if (typeof o.dconnuri !== "string" || !/^[a-z0-9+]+:\/\//.test(o.dconnuri)) {
    throw new InvalidArgumentError(`${where}: dconnuri: expected a libvirt URI such as qemu:///system, got ${show(JSON.stringify(o.dconnuri))}`);
  }
  if (typeof o.migrateuri !== "string" || !/^tcp:\/\/[A-Za-z0-9.-]+:\d{1,5}$/.test(o.migrateuri)) {
    throw new InvalidArgumentError(`${where}: migrateuri: expected tcp://HOST:PORT, got ${show(JSON.stringify(o.migrateuri))}`);
  }
  return { dconnuri: o.dconnuri, migrateuri: o.migrateuri };
}

// ---- the event stream (`virsh event --all --loop --timestamp`) ------------------------

/** One event from `virsh event --loop`. */
export type VirshEvent =
  /** e.g. "Suspended" / "Post-copy", "Resumed" / "Migrated", "Stopped" / "Failed". */
  | { kind: "lifecycle"; domain: string; event: string; detail: string }
  | { kind: "migration-iteration"; domain: string; iteration: number }
  | { kind: "job-completed"; domain: string; stats: JobStats }
  /** Any other event type, by name (reboot, balloon-change, ...). */
  | { kind: "other"; domain: string; type: string };

const EVENT_LINE = /^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\+\d{4}: )?event '([a-z-]+)' for domain '([^']+)':?\s?(.*)$/;

/**
 * An incremental parser for `virsh event --all --loop --timestamp`: feed it
 * stdout chunks, it returns whole events. A job-completed event is a header
 * line plus tab-indented parameters; it is complete at the next event line
 * or at {@link VirshEventStream.flush} (the driver flushes once the stream
 * has been quiet briefly, since virsh prints each event in one go). Lines
 * that are not events ("events received", warnings) are ignored; a
 * malformed event throws, naming the event and the field.
 */
export class VirshEventStream {
  private buffer = "";
  private pending: { domain: string; lines: string[] } | undefined;

  /** True while a job-completed block may still be receiving lines. */
  get hasPending(): boolean {
    return this.pending !== undefined;
  }

  push(chunk: string): VirshEvent[] {
    this.buffer += chunk;
    const out: VirshEvent[] = [];
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      this.line(line, out);
    }
    return out;
  }

  /** Ends a pending job-completed block. */
  flush(): VirshEvent[] {
    const out: VirshEvent[] = [];
    this.closePending(out);
    return out;
  }

  private line(line: string, out: VirshEvent[]): void {
    if (this.pending && /^\t/.test(line)) {
      this.pending.lines.push(line.trim());
      return;
    }
    this.closePending(out);
    const m = EVENT_LINE.exec(line.trim());
    if (!m) return;
    const [, type, domain, rest] = m as unknown as [string, string, string, string];
    if (type === "lifecycle") {
      const lm = /^(\S+) (.+)$/.exec(rest.trim());
      if (!lm) fail("event lifecycle", "detail", `expected "<event> <detail>", got ${show(rest)}`);
      out.push({ kind: "lifecycle", domain, event: lm[1] as string, detail: lm[2] as string });
    } else if (type === "migration-iteration") {
      const im = /^iteration: '(\d+)'$/.exec(rest.trim());
      if (!im) fail("event migration-iteration", "iteration", `expected "iteration: '<n>'", got ${show(rest)}`);
      out.push({ kind: "migration-iteration", domain, iteration: Number(im[1]) });
    } else if (type === "job-completed") {
      this.pending = { domain, lines: [] };
    } else {
      out.push({ kind: "other", domain, type });
    }
  }

  private closePending(out: VirshEvent[]): void {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    if (p.lines.length === 0) fail("event job-completed", "output", "the event has no parameters");
    out.push({ kind: "job-completed", domain: p.domain, stats: { jobType: JOB_TYPE.completed, ...jobParams(p.lines, "event job-completed") } });
  }
}
