// Fuzzing the QMP reader (coordinator/qmp-client.ts framing and dispatch) and the QMP answer parsers
// (coordinator/qemu.ts parseQueryMigrate, coordinator/qmp-driver.ts parseGuestStats/translateQmpEvent).
// Property: every command settles, resolved or rejected with a named error carrying a message; no
// exception escapes the socket's data handler (in the coordinator that is an uncaught exception);
// every number that comes out is finite, and the parsers' counters are safe integers.
import { mkdtempSync, rmSync } from "node:fs";
import { EventEmitter } from "node:events";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { QmpClient, QmpCommandError, QmpDisconnectedError, QmpProtocolError, type QmpEvent } from "../../coordinator/qmp-client.js";
import { parseQueryMigrate } from "../../coordinator/qemu.js";
import { parseGuestStats, translateQmpEvent } from "../../coordinator/qmp-driver.js";
import { BallastError, InvalidArgumentError } from "../../shared/errors.js";
import { silentLogger } from "../../shared/logger.js";

const RUNS = 10_000;
/** One logger for every client: a fresh silent pino per client costs more than the case itself. */
const logger = silentLogger();
const GREETING = { QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "Debian 1:7.2+dfsg-7+deb12u18+b3" }, capabilities: ["oob"] } };
/** A real QEMU 7.2 `query-migrate` answer during pre-copy. */
const QUERY_MIGRATE_ACTIVE = {
  "expected-downtime": 300,
  status: "active",
  "setup-time": 3,
  "total-time": 1520,
  ram: {
    total: 1091379200,
    "postcopy-requests": 0,
    "dirty-sync-count": 1,
    "multifd-bytes": 0,
    "pages-per-second": 35840,
    "downtime-bytes": 0,
    page_size: 4096,
    remaining: 883195904,
    "postcopy-bytes": 0,
    mbps: 268.59,
    transferred: 46431442,
    "dirty-sync-missed-zero-copy": 0,
    "precopy-bytes": 46431442,
    duplicate: 39551,
    "dirty-pages-rate": 0,
    skipped: 0,
    "normal-bytes": 45809664,
    normal: 11184,
  },
};

// ---- shared checks ---------------------------------------------------------------

function numbers(v: unknown, path = "", out: Array<[string, number]> = [], depth = 0): Array<[string, number]> {
  if (depth > 50) return out;
  if (typeof v === "number") out.push([path, v]);
  else if (typeof v === "object" && v !== null && path !== "raw") for (const [k, x] of Object.entries(v)) numbers(x, path ? `${path}.${k}` : k, out, depth + 1);
  return out;
}

function expectSafeIntegers(v: unknown, floats: ReadonlySet<string> = new Set()): void {
  for (const [path, n] of numbers(v)) {
    if (floats.has(path) ? !Number.isFinite(n) : !Number.isSafeInteger(n)) throw new Error(`${path} = ${n}`);
  }
}

/** JSON values with hostile numbers: huge, tiny, negative, fractional, -0, 2^53±1, values JSON.parse turns into Infinity. */
const hostileNumber = fc.oneof(
  fc.constantFrom(0, -0, 1, -1, 0.5, 2 ** 31, 2 ** 32, 2 ** 32 - 1, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e300, -1e300, Number.MIN_VALUE),
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
);
/** A JSON text for a number, including ones JSON.parse reads as ±Infinity. */
const hostileNumberText = fc.oneof(hostileNumber.map((n) => JSON.stringify(n)), fc.constantFrom("1e400", "-1e400", "123456789012345678901234567890", "1E+999", "-0.0"));
const jsonValue: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: "small", withCrossShrink: true },
    fc.constant(null),
    fc.boolean(),
    hostileNumber,
    fc.string({ maxLength: 12 }),
    fc.array(tie("value"), { maxLength: 4 }),
    fc.dictionary(fc.oneof(fc.string({ maxLength: 8 }), fc.constantFrom("id", "return", "error", "event", "data", "timestamp", "class", "desc", "QMP", "__proto__", "constructor")), tie("value"), { maxKeys: 5 }),
  ),
})).value;

const deep = (n: number, open = "[", close = "]") => `${open.repeat(n)}${close.repeat(n)}`;

// ---- an in-memory QMP socket --------------------------------------------------------

/** Stands in for the net.Socket QmpClient opens: the test feeds `data`, reads what the client wrote. */
class FakeSocket extends EventEmitter {
  destroyed = false;
  readonly written: Array<{ execute: string; id: number }> = [];
  setEncoding(): this {
    return this;
  }
  write(line: string): boolean {
    this.written.push(JSON.parse(line) as { execute: string; id: number });
    return true;
  }
  destroy(): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    setImmediate(() => this.emit("close"));
    return this;
  }
  /** Delivers one chunk; an exception out of the client's data handler would be an uncaught exception in production. */
  feed(chunk: string): void {
    if (this.destroyed) return;
    try {
      this.emit("data", chunk);
    } catch (err) {
      throw new Error(`the client's data handler threw on ${JSON.stringify(chunk.slice(0, 120))}: ${String(err)}`, { cause: err });
    }
  }
}

let sockets: FakeSocket[] = [];
const spy = vi.spyOn(net, "createConnection").mockImplementation((() => {
  const s = new FakeSocket();
  sockets.push(s);
  return s as unknown as net.Socket;
}) as unknown as typeof net.createConnection);
afterAll(() => spy.mockRestore());
afterEach(() => {
  sockets = [];
});

/** Splits `text` at the given fractions. */
function splitAt(text: string, cuts: readonly number[]): string[] {
  const points = [...new Set(cuts.map((c) => Math.floor(c * text.length)))].sort((a, b) => a - b);
  const out: string[] = [];
  let last = 0;
  for (const p of points) {
    out.push(text.slice(last, p));
    last = p;
  }
  out.push(text.slice(last));
  return out.filter((c) => c.length > 0);
}

/** Lines a hostile peer sends once the session is up. `ids` are the pending command ids. */
const peerLine = (ids: readonly number[]) =>
  fc.oneof(
    { weight: 4, arbitrary: fc.tuple(fc.constantFrom(...ids), jsonValue).map(([id, r]) => JSON.stringify({ return: r, id })) },
    { weight: 2, arbitrary: fc.tuple(fc.constantFrom(...ids), jsonValue, jsonValue).map(([id, cls, desc]) => JSON.stringify({ error: { class: cls, desc }, id })) },
    { weight: 1, arbitrary: fc.tuple(fc.oneof(fc.constantFrom(...ids), jsonValue), jsonValue).map(([id, e]) => JSON.stringify({ error: e, id })) },
    {
      weight: 3,
      arbitrary: fc
        .tuple(fc.constantFrom("MIGRATION", "MIGRATION_PASS", "BALLOON_CHANGE", "STOP", "RESUME", "VSERPORT_CHANGE", "SHUTDOWN", ""), jsonValue, hostileNumberText, hostileNumberText, jsonValue)
        .map(([event, data, sec, usec, field]) => {
          const d = typeof data === "object" && data !== null && !Array.isArray(data) ? data : {};
          const payload = JSON.stringify({ ...d, pass: field, actual: field, status: field, id: "agentport", open: field });
          return `{"event":${JSON.stringify(event)},"data":${payload},"timestamp":{"seconds":${sec},"microseconds":${usec}}}`;
        }),
    },
    { weight: 1, arbitrary: fc.tuple(fc.constantFrom(...ids), hostileNumberText).map(([id, n]) => `{"return":{"actual":${n},"base-memory":${n}},"id":${id}}`) },
    { weight: 1, arbitrary: hostileNumberText.map((n) => `{"return":{},"id":${n}}`) },
    { weight: 1, arbitrary: jsonValue.map((v) => JSON.stringify(v) ?? "null") },
    { weight: 1, arbitrary: fc.string({ maxLength: 30, unit: "binary" }) },
    { weight: 1, arbitrary: fc.constantFrom("", " ", "\r", "{", "}", '{"return":', "[1,2", "nul", '"\\ud800"', "\uFEFF{}") },
    // Deep nesting: JSON.parse copes, JSON.stringify of the result overflows the stack.
    {
      weight: 1,
      // 6000 deep overflows JSON.stringify, and a stack overflow costs ~30 ms: kept rare here, certain in the regressions below.
      arbitrary: fc.oneof({ weight: 20, arbitrary: fc.constantFrom(10, 1000) }, { weight: 1, arbitrary: fc.constant(6000) }).chain((n) => fc.constantFrom(deep(n), `{"x":${deep(n)}}`, `{"error":${deep(n, '{"a":', "}").replace(/\{"a":\}/, "{}")},"id":2}`, `{"event":"STOP","data":{"d":${deep(n)}}}`, `{"unknown":${deep(n)}}`, `{"return":${deep(n)}}`)) },
    // A long line (a large answer), complete or not.
    { weight: 1, arbitrary: fc.constantFrom(ids[0]!).chain((id) => fc.nat({ max: 50_000 }).map((n) => `{"return":"${"x".repeat(n)}","id":${id}}`)) },
  );

const SETTLE = (p: Promise<unknown>) =>
  p.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );

function expectNamedError(err: unknown): void {
  expect(err, String(err)).toBeInstanceOf(BallastError);
  expect((err as Error).message.length).toBeGreaterThan(0);
}

function expectSaneEvent(e: QmpEvent): void {
  expect(typeof e.event).toBe("string");
  expect(typeof e.data === "object" && e.data !== null && !Array.isArray(e.data)).toBe(true);
  expect(Number.isFinite(e.timestamp.seconds), `seconds ${e.timestamp.seconds}`).toBe(true);
  expect(Number.isFinite(e.timestamp.microseconds), `microseconds ${e.timestamp.microseconds}`).toBe(true);
  const d = translateQmpEvent(e);
  if (d) expectSafeIntegers(d);
  if (d?.type === "migration-pass") expect(d.pass >= 0 && d.pass <= 0xffff_ffff, `pass ${d.pass}`).toBe(true);
  if (d?.type === "balloon-change") expect(d.actualBytes).toBeGreaterThanOrEqual(0);
}

const tick = () => new Promise<void>((r) => setImmediate(r));

describe("fuzz: QmpClient framing and dispatch", () => {
  it(`a hostile peer after the handshake: commands settle with named errors, events are sane, no handler throws (${RUNS} cases)`, async () => {
    const scenario = fc.integer({ min: 1, max: 4 }).chain((n) => {
      const ids = Array.from({ length: n }, (_, i) => i + 2); // 1 is qmp_capabilities
      return fc.record({ n: fc.constant(n), lines: fc.array(peerLine(ids), { maxLength: 5 }), cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 6 }), crlf: fc.boolean() });
    });
    await fc.assert(
      fc.asyncProperty(scenario, async ({ n, lines, cuts, crlf }) => {
        const client = new QmpClient({ socketPath: "/fuzz/qmp.sock", reconnect: false, logger });
        const events: QmpEvent[] = [];
        client.on("event", (e) => events.push(e));
        const connected = client.connect();
        const sock = sockets.at(-1)!;
        sock.feed(`${JSON.stringify(GREETING)}\r\n`);
        expect(sock.written[0]?.execute).toBe("qmp_capabilities");
        sock.feed(`{"return": {}, "id": ${sock.written[0]!.id}}\r\n`);
        await connected;
        const commands = Array.from({ length: n }, (_, i) => SETTLE(client.execute(i % 2 ? "query-migrate" : "query-balloon", undefined, { timeoutMs: 60_000 })));
        const stream = lines.map((l) => l + (crlf ? "\r\n" : "\n")).join("");
        for (const chunk of splitAt(stream, cuts)) sock.feed(chunk);
        await client.close();
        for (const r of await Promise.all(commands)) {
          if (!r.ok) expectNamedError(r.error);
        }
        events.forEach(expectSaneEvent);
      }),
      { numRuns: RUNS },
    );
  }, 120_000);

  it(`a hostile peer during the handshake: connect resolves or rejects with QmpDisconnectedError (${RUNS} cases)`, async () => {
    const greetingish = fc.oneof(
      jsonValue.map((v) => JSON.stringify({ QMP: v })),
      fc.tuple(hostileNumberText, hostileNumberText, jsonValue).map(([a, b, c]) => `{"QMP":{"version":{"qemu":{"major":${a},"minor":${b},"micro":0},"package":${JSON.stringify(c) ?? 0}},"capabilities":${JSON.stringify(c) ?? "[]"}}}`),
      peerLine([1]),
    );
    const scenario = fc.record({ lines: fc.array(greetingish, { minLength: 1, maxLength: 4 }), cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 4 }) });
    await fc.assert(
      fc.asyncProperty(scenario, async ({ lines, cuts }) => {
        const client = new QmpClient({ socketPath: "/fuzz/qmp.sock", reconnect: false, logger });
        const connected = SETTLE(client.connect());
        const sock = sockets.at(-1)!;
        for (const chunk of splitAt(lines.map((l) => `${l}\n`).join(""), cuts)) sock.feed(chunk);
        // Answer qmp_capabilities if the client got that far.
        if (sock.written[0]) sock.feed(`{"return":{},"id":${sock.written[0].id}}\n`);
        await tick();
        await client.close();
        const r = await connected;
        if (!r.ok) {
          expect(r.error).toBeInstanceOf(QmpDisconnectedError);
          expectNamedError(r.error);
        } else {
          const v = client.greeting!.version.qemu;
          expectSafeIntegers(v);
        }
      }),
      { numRuns: RUNS },
    );
  }, 120_000);
});

// The same reader through a real unix socket, with the kernel choosing the chunking: fewer cases, since each one is a connection.
describe("fuzz: QmpClient over a real unix socket peer", () => {
  const dir = mkdtempSync(join(tmpdir(), "ballast-fuzz-qmp-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("300 hostile sessions, split at random points", async () => {
    spy.mockRestore();
    const path = join(dir, "qmp.sock");
    let script: (sock: net.Socket) => void = () => {};
    const server = net.createServer((sock) => script(sock));
    await new Promise<void>((r) => server.listen(path, r));
    try {
      await fc.assert(
        fc.asyncProperty(fc.array(peerLine([2, 3]), { maxLength: 6 }), fc.array(fc.nat({ max: 4000 }), { maxLength: 5 }), async (lines_, cuts) => {
          script = (sock) => {
            sock.write(`${JSON.stringify(GREETING)}\r\n`);
            let buf = "";
            let seen = 0;
            sock.on("data", (d) => {
              buf += d.toString();
              const lines = buf.split("\n");
              buf = lines.pop() ?? "";
              for (const l of lines) {
                if (!l.trim()) continue;
                seen++;
                if (seen === 1) sock.write(`{"return": {}, "id": ${(JSON.parse(l) as { id: number }).id}}\r\n`);
              }
              // Both commands are pending: now the hostile stream, in kernel-sized pieces at random cuts.
              if (seen !== 3) return;
              seen++;
              const text = lines_.map((l) => `${l}\r\n`).join("");
              let at = 0;
              for (const c of [...cuts].sort((a, b) => a - b)) {
                sock.write(text.slice(at, Math.max(at, c)));
                at = Math.max(at, c);
              }
              sock.end(text.slice(at));
            });
            sock.on("error", () => {});
          };
          const client = new QmpClient({ socketPath: path, reconnect: false, commandTimeoutMs: 2000, logger });
          const events: QmpEvent[] = [];
          client.on("event", (e) => events.push(e));
          await client.connect();
          const a = SETTLE(client.execute("query-balloon"));
          const b = SETTLE(client.execute("query-migrate"));
          const results = await Promise.all([a, b]);
          await client.close();
          for (const r of results) if (!r.ok) expectNamedError(r.error);
          events.forEach(expectSaneEvent);
        }),
        { numRuns: 300 },
      );
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  }, 120_000);
});

describe("fuzz: QMP answer parsers", () => {
  const MIGRATE_FLOATS = new Set(["mbps"]);
  /** A real answer with some fields replaced (top level or in ram), or dropped, or a whole section replaced. */
  const mutatedMigrate = fc
    .array(
      fc.tuple(
        fc.constantFrom("top", "ram"),
        fc.constantFrom("status", "total-time", "downtime", "setup-time", "postcopy-blocktime", "error-desc", "ram", "transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-sync-count", "postcopy-requests", "precopy-bytes", "postcopy-bytes", "mbps"),
        fc.oneof(jsonValue, hostileNumberText.map((t) => JSON.parse(t) as unknown), fc.constant(undefined)),
      ),
      { minLength: 1, maxLength: 5 },
    )
    .map((edits) => {
      const top: Record<string, unknown> = structuredClone(QUERY_MIGRATE_ACTIVE);
      for (const [where, key, value] of edits) {
        const target = where === "ram" && typeof top.ram === "object" && top.ram !== null ? (top.ram as Record<string, unknown>) : top;
        if (value === undefined) delete target[key];
        else target[key] = value;
      }
      return top;
    });

  it(`parseQueryMigrate: InvalidArgumentError or safe non-negative integer counters and a finite mbps (${RUNS} cases)`, () => {
    fc.assert(
      fc.property(fc.oneof(mutatedMigrate, jsonValue), (raw) => {
        let stats;
        try {
          stats = parseQueryMigrate(raw);
        } catch (err) {
          expect(err).toBeInstanceOf(InvalidArgumentError);
          expect((err as Error).message).toMatch(/^query-migrate/);
          return;
        }
        expectSafeIntegers(stats, MIGRATE_FLOATS);
        for (const [path, n] of numbers(stats)) if (path !== "mbps") expect(n, path).toBeGreaterThanOrEqual(0);
        expect(typeof stats.status).toBe("string");
        expect(typeof stats.errorDesc).toBe("string");
      }),
      { numRuns: RUNS },
    );
  });

  it(`parseGuestStats: undefined or safe non-negative numbers (${RUNS} cases)`, () => {
    const statsish = fc.oneof(
      jsonValue,
      fc
        .record({
          stats: fc.dictionary(fc.constantFrom("stat-available-memory", "stat-free-memory", "stat-disk-caches", "stat-total-memory"), fc.oneof(hostileNumber, jsonValue, hostileNumberText.map((t) => JSON.parse(t) as unknown))),
          "last-update": fc.oneof(hostileNumber, jsonValue, hostileNumberText.map((t) => JSON.parse(t) as unknown)),
        })
        .map((r) => r as unknown),
    );
    fc.assert(
      fc.property(statsish, (raw) => {
        const s = parseGuestStats(raw);
        if (s === undefined) return;
        for (const [path, n] of numbers(s)) {
          if (path === "lastUpdateS") expect(Number.isFinite(n), `${path} ${n}`).toBe(true);
          else expect(Number.isSafeInteger(n) && n >= 0, `${path} ${n}`).toBe(true);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it(`translateQmpEvent: undefined or a driver event with sane numbers (${RUNS} cases)`, () => {
    const ev = fc.record({
      event: fc.constantFrom("MIGRATION", "MIGRATION_PASS", "BALLOON_CHANGE", "STOP", "RESUME", "VSERPORT_CHANGE", "x"),
      data: fc.dictionary(fc.constantFrom("status", "pass", "actual", "id", "open"), fc.oneof(jsonValue, hostileNumberText.map((t) => JSON.parse(t) as unknown), fc.constant("agentport"))),
      timestamp: fc.constant({ seconds: 1, microseconds: 2 }),
    });
    fc.assert(
      fc.property(ev, (e) => {
        expectSaneEvent(e as QmpEvent);
      }),
      { numRuns: RUNS },
    );
  });
});

// Counterexamples the fuzzing found, kept as plain regression tests.
describe("fuzz regressions: QMP", () => {
  async function session() {
    const s = vi.spyOn(net, "createConnection").mockImplementation((() => {
      const f = new FakeSocket();
      sockets.push(f);
      return f as unknown as net.Socket;
    }) as unknown as typeof net.createConnection);
    const client = new QmpClient({ socketPath: "/fuzz/qmp.sock", reconnect: false, logger });
    const connected = client.connect();
    const sock = sockets.at(-1)!;
    sock.feed(`${JSON.stringify(GREETING)}\n`);
    sock.feed(`{"return":{},"id":1}\n`);
    await connected;
    s.mockRestore();
    return { client, sock };
  }

  it.each([
    ["a deeply nested array (JSON.stringify of it overflowed the stack inside the data handler)", deep(20000)],
    ["a deeply nested unknown message", `{"unknown":${deep(20000)}}`],
  ])("%s: a protocol error or a warning, not an exception", async (_n, line) => {
    const { client, sock } = await session();
    const pending = SETTLE(client.execute("query-status"));
    sock.feed(`${line}\n`);
    await client.close();
    const r = await pending;
    if (!r.ok) expectNamedError(r.error);
  });

  it("an error reply whose error is deeply nested: a QmpCommandError, not a stack overflow", async () => {
    const { client, sock } = await session();
    const pending = SETTLE(client.execute("query-status"));
    sock.feed(`{"error":${deep(20000)},"id":2}\n`);
    const r = await pending;
    expect(r.ok).toBe(false);
    expect((r as { error: unknown }).error).toBeInstanceOf(QmpCommandError);
    await client.close();
  });

  it("an event timestamp of 1e400 (Infinity after JSON.parse) reads as 0", async () => {
    const { client, sock } = await session();
    const events: QmpEvent[] = [];
    client.on("event", (e) => events.push(e));
    sock.feed(`{"event":"STOP","timestamp":{"seconds":1e400,"microseconds":-1e400}}\n`);
    expect(events[0]?.timestamp).toEqual({ seconds: 0, microseconds: 0 });
    await client.close();
  });

  it("a greeting with version 1e400 is not a greeting", async () => {
    const s = vi.spyOn(net, "createConnection").mockImplementation((() => {
      const f = new FakeSocket();
      sockets.push(f);
      return f as unknown as net.Socket;
    }) as unknown as typeof net.createConnection);
    const client = new QmpClient({ socketPath: "/fuzz/qmp.sock", reconnect: false, logger });
    const connected = SETTLE(client.connect());
    sockets.at(-1)!.feed(`{"QMP":{"version":{"qemu":{"major":1e400,"minor":2,"micro":0}},"capabilities":[]}}\n`);
    s.mockRestore();
    const r = await connected;
    expect(r.ok).toBe(false);
    expect((r as { error: unknown }).error).toBeInstanceOf(QmpProtocolError);
    await client.close();
  });

  it.each([
    ["total-time", 1e300],
    ["setup-time", 2 ** 53],
    ["downtime", -1],
  ])("query-migrate %s = %s is refused (was accepted: an unsafe or negative integer)", (key, value) => {
    expect(() => parseQueryMigrate({ ...QUERY_MIGRATE_ACTIVE, [key]: value })).toThrow(InvalidArgumentError);
  });

  it("query-migrate ram.transferred = 1e400 (Infinity) is refused", () => {
    expect(() => parseQueryMigrate(JSON.parse('{"status":"active","ram":{"transferred":1e400}}'))).toThrow(/ram\.transferred/);
  });

  it.each([[Number.POSITIVE_INFINITY], [-1], [1.5], [2 ** 32]])("MIGRATION_PASS with pass %s is dropped (was passed on; a uint32 on the wire)", (pass) => {
    expect(translateQmpEvent({ event: "MIGRATION_PASS", data: { pass }, timestamp: { seconds: 0, microseconds: 0 } })).toBeUndefined();
  });
});
