/**
 * The virsh parsers on outputs captured from this machine's libvirt 9.0.0
 * (test/fixtures/virsh, README there says how) and on malformed variants:
 * each malformed output is an error naming the command and the field.
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  classifyVirshError,
  cleanVirshError,
  jobStatsToMigrateStats,
  JOB_OPERATION,
  JOB_TYPE,
  migrationStatusOf,
  parseDominfo,
  parseDomjobinfoRaw,
  parseDommemstat,
  parseDomstate,
  parseIncomingUri,
  parseJobCompletedEvent,
  runStateOf,
  VirshEventStream,
} from "../../coordinator/virsh-parse.js";
import { InvalidArgumentError } from "../../shared/errors.js";

const fx = (name: string) => readFileSync(new URL(`../fixtures/virsh/${name}`, import.meta.url), "utf8");
const MiB = 1024 * 1024;

describe("dominfo", () => {
  it.each([
    { file: "dominfo-running.txt", id: 2, state: "running", used: 1024 * MiB, persistent: false, messages: 2 },
    { file: "dominfo-ballooned.txt", id: 2, state: "running", used: 512 * MiB, persistent: false, messages: 2 },
    { file: "dominfo-incoming.txt", id: 1, state: "paused", used: 1024 * MiB, persistent: false, messages: 3 },
    { file: "dominfo-shutoff.txt", id: undefined, state: "shut off", used: 1024 * MiB, persistent: true, messages: 0 },
  ])("$file", (c) => {
    const d = parseDominfo(fx(c.file));
    expect(d.id).toBe(c.id);
    expect(d.state).toBe(c.state);
    expect(d.maxMemoryBytes).toBe(1024 * MiB);
    expect(d.usedMemoryBytes).toBe(c.used);
    expect(d.persistent).toBe(c.persistent);
    expect(d.messages).toHaveLength(c.messages);
    expect(d.name).toMatch(/^vm/);
  });

  it("keeps the taint messages", () => {
    expect(parseDominfo(fx("dominfo-running.txt")).messages).toContain("tainted: custom configuration parameters specified");
  });

  const good = fx("dominfo-running.txt");
  it.each([
    { what: "Max memory in GiB", text: good.replace("Max memory:     1048576 KiB", "Max memory:     1 GiB"), err: /virsh dominfo: Max memory: expected "<n> KiB"/ },
    { what: "no Used memory", text: good.replace(/Used memory:.*\n/, ""), err: /virsh dominfo: Used memory: missing/ },
    { what: "unknown state", text: good.replace("State:          running", "State:          exploded"), err: /virsh dominfo: State: unknown state "exploded"/ },
    { what: "bad id", text: good.replace("Id:             2", "Id:             two"), err: /virsh dominfo: Id: expected a number/ },
    { what: "bad uuid", text: good.replace(/UUID:.*/, "UUID: nope"), err: /virsh dominfo: UUID: expected a UUID/ },
    { what: "garbage line", text: `${good}\n???\n`, err: /virsh dominfo: output: unexpected line "\?\?\?"/ },
    { what: "duplicate key", text: `${good}Name: again\n`, err: /virsh dominfo: Name: appears twice/ },
    { what: "empty", text: "", err: /virsh dominfo: Id: missing/ },
  ])("malformed: $what", ({ text, err }) => {
    expect(() => parseDominfo(text)).toThrow(InvalidArgumentError);
    expect(() => parseDominfo(text)).toThrow(err);
  });
});

describe("domstate --reason", () => {
  it.each([
    { file: "domstate-running.txt", state: "running", reason: "booted", src: "running", dst: "running", msSrc: "active", msDst: "completed" },
    { file: "domstate-incoming.txt", state: "paused", reason: "migrating", src: "finish-migrate", dst: "inmigrate", msSrc: "active", msDst: "active" },
    { file: "domstate-migrated.txt", state: "running", reason: "migrated", src: "running", dst: "running", msSrc: "active", msDst: "completed" },
    { file: "domstate-postcopy-src.txt", state: "paused", reason: "post-copy", src: "postmigrate", dst: "postmigrate", msSrc: "postcopy-active", msDst: undefined },
    { file: "domstate-postcopy-dst.txt", state: "running", reason: "post-copy", src: "running", dst: "running", msSrc: "active", msDst: "postcopy-active" },
    { file: "domstate-after-abort.txt", state: "running", reason: "migrated", src: "running", dst: "running", msSrc: "active", msDst: "completed" },
    { file: "domstate-shutoff.txt", state: "shut off", reason: "unknown", src: undefined, dst: undefined, msSrc: undefined, msDst: undefined },
  ])("$file", (c) => {
    const s = parseDomstate(fx(c.file));
    expect(s).toEqual({ state: c.state, reason: c.reason });
    expect(runStateOf(s, "outgoing")).toBe(c.src);
    expect(runStateOf(s, "incoming")).toBe(c.dst);
    expect(migrationStatusOf(s, "source")).toBe(c.msSrc);
    expect(migrationStatusOf(s, "destination")).toBe(c.msDst);
  });

  it.each([
    { state: "paused", reason: "user", run: "paused" },
    { state: "paused", reason: "starting up", run: "prelaunch" },
    { state: "paused", reason: "migrating", run: "inmigrate" },
    { state: "paused", reason: "incoming migration", run: "inmigrate" },
    { state: "paused", reason: "post-copy failed", run: "postcopy-paused" },
    { state: "crashed", reason: "panicked", run: undefined },
    { state: "pmsuspended", reason: "unknown", run: "suspended" },
  ])("run state of $state ($reason) on a host with no migration is $run", (c) => {
    expect(runStateOf({ state: c.state, reason: c.reason }, "none")).toBe(c.run);
  });

  it("a host expecting an incoming domain sees it paused (starting up) before the stream begins", () => {
    const s = { state: "paused", reason: "starting up" };
    expect(runStateOf(s, "incoming")).toBe("inmigrate");
    expect(migrationStatusOf(s, "destination")).toBe("active");
  });

  it.each([
    { what: "no reason", text: "running\n", err: /virsh domstate --reason: state: expected "<state> \(<reason>\)"/ },
    { what: "unknown state", text: "flying (high)\n", err: /virsh domstate --reason: state: unknown state "flying"/ },
    { what: "two lines", text: "running (booted)\nrunning (booted)\n", err: /virsh domstate --reason: output: expected one line, got 2/ },
    { what: "empty", text: "\n", err: /expected one line, got 0/ },
  ])("malformed: $what", ({ text, err }) => {
    expect(() => parseDomstate(text)).toThrow(err);
  });
});

describe("dommemstat", () => {
  it.each([
    { file: "dommemstat-running.txt", actual: 1024 * MiB, usable: 876208 * 1024, unused: 941976 * 1024, last: 1796172511 },
    { file: "dommemstat-ballooned.txt", actual: 512 * MiB, usable: 352552 * 1024, unused: 418320 * 1024, last: 1796172523 },
    { file: "dommemstat-incoming.txt", actual: 1024 * MiB, usable: 836140 * 1024, unused: 901908 * 1024, last: 1796172538 },
    { file: "dommemstat-before-period.txt", actual: 1024 * MiB, usable: 876208 * 1024, unused: 941976 * 1024, last: 1796172507 },
  ])("$file (KiB to bytes)", (c) => {
    const m = parseDommemstat(fx(c.file));
    expect(m.actualBytes).toBe(c.actual);
    expect(m.usableBytes).toBe(c.usable);
    expect(m.unusedBytes).toBe(c.unused);
    expect(m.availableBytes).toBe(981832 * 1024); // MemTotal: deflate-on-oom keeps it while ballooned
    expect(m.diskCachesBytes).toBe(2116 * 1024);
    expect(m.lastUpdateS).toBe(c.last);
    expect(m.fields.major_fault).toBe(9); // a counter, not KiB
  });

  it("a guest without stats reports only actual (and rss)", () => {
    const m = parseDommemstat("actual 1048576\nrss 25000\n");
    expect(m.actualBytes).toBe(1024 * MiB);
    expect(m.usableBytes).toBeUndefined();
    expect(m.lastUpdateS).toBe(0);
  });

  it.each([
    { what: "no actual", text: "unused 5\n", err: /virsh dommemstat: actual: missing/ },
    { what: "negative", text: "actual -5\n", err: /virsh dommemstat: actual: expected a non-negative integer, got "-5"/ },
    { what: "fraction", text: "actual 1048576\nusable 1.5\n", err: /virsh dommemstat: usable: expected a non-negative integer/ },
    { what: "garbage", text: "actual 1048576\nwhat is this\n", err: /virsh dommemstat: output: unexpected line/ },
    { what: "duplicate", text: "actual 1\nactual 2\n", err: /virsh dommemstat: actual: appears twice/ },
    { what: "huge", text: "actual 99999999999999999\n", err: /virsh dommemstat: actual: .* out of range/ },
  ])("malformed: $what", ({ text, err }) => {
    expect(() => parseDommemstat(text)).toThrow(err);
  });
});

describe("domjobinfo --rawstats and the job-completed event", () => {
  it("an outgoing pre-copy job in progress", () => {
    const j = parseDomjobinfoRaw(fx("domjobinfo-active-src-raw.txt"));
    expect(j.jobType).toBe(JOB_TYPE.unbounded);
    expect(j.numbers.operation).toBe(JOB_OPERATION.migrationOut);
    const s = jobStatsToMigrateStats(j, "active");
    expect(s).toMatchObject({
      status: "active",
      totalTimeMs: 1999,
      downtimeMs: 0, // 300 is libvirt's expectation while running
      setupTimeMs: 1,
      transferredBytes: 31491874,
      remainingBytes: 158523392,
      totalBytes: 1074135040,
      duplicatePages: 216339,
      normalPages: 7199,
      normalBytes: 29487104,
      dirtySyncCount: 1,
      postcopyRequests: 0,
    });
    expect(s.mbps).toBeCloseTo(168.1, 1);
  });

  it("an outgoing job in post-copy counts post-copy requests", () => {
    const s = jobStatsToMigrateStats(parseDomjobinfoRaw(fx("domjobinfo-postcopy-src-raw.txt")), "postcopy-active");
    expect(s.postcopyRequests).toBe(21);
    expect(s.dirtySyncCount).toBe(2);
    expect(s.downtimeMs).toBe(0);
  });

  it("a completed incoming job on the destination", () => {
    const j = parseDomjobinfoRaw(fx("domjobinfo-completed-dst-raw.txt"));
    expect(j.jobType).toBe(JOB_TYPE.completed);
    expect(j.numbers.operation).toBe(JOB_OPERATION.migrationIn);
    expect(jobStatsToMigrateStats(j, "completed")).toMatchObject({ totalTimeMs: 4824, downtimeMs: 66, transferredBytes: 90301712, remainingBytes: 0, dirtySyncCount: 3 });
  });

  it.each(["domjobinfo-completed-after-cancel-raw.txt"])("no job: %s", (f) => {
    const j = parseDomjobinfoRaw(fx(f));
    expect(j.jobType).toBe(JOB_TYPE.none);
    expect(j.numbers).toEqual({});
  });

  it("the source's job-completed event has the final numbers", () => {
    const j = parseJobCompletedEvent(fx("event-job-completed.txt"));
    expect(j).toBeDefined();
    const s = jobStatsToMigrateStats(j!, "completed");
    expect(s).toMatchObject({ status: "completed", totalTimeMs: 4842, downtimeMs: 66, transferredBytes: 90301712, dirtySyncCount: 3, remainingBytes: 0 });
    expect((s.raw as Record<string, unknown>).operation).toBe(JOB_OPERATION.migrationOut);
  });

  it("no event printed yet", () => {
    expect(parseJobCompletedEvent("")).toBeUndefined();
  });

  it("errmsg is a string parameter", () => {
    const j = parseDomjobinfoRaw("Job type: 4\n\noperation: 5\ntime_elapsed: 10\nerrmsg: unable to connect to server\n");
    expect(jobStatsToMigrateStats(j, "failed").errorDesc).toBe("unable to connect to server");
  });

  it.each([
    { what: "no job type", text: "operation: 5\n", err: /virsh domjobinfo --rawstats: Job type: expected "Job type: <n>" first/ },
    { what: "pretty output", text: fx("domjobinfo-active-src.txt"), err: /virsh domjobinfo --rawstats: Job type/ },
    { what: "unknown job type", text: "Job type: 9\n", err: /virsh domjobinfo --rawstats: Job type: unknown job type 9/ },
    { what: "unit in a number", text: "Job type: 2\n\nmemory_processed: 27.998 MiB\n", err: /virsh domjobinfo --rawstats: memory_processed: expected an integer, got "27.998 MiB"/ },
    { what: "duplicate", text: "Job type: 2\n\ntime_elapsed: 1\ntime_elapsed: 2\n", err: /virsh domjobinfo --rawstats: time_elapsed: appears twice/ },
    { what: "garbage", text: "Job type: 2\n\nHello World\n", err: /virsh domjobinfo --rawstats: output: unexpected line/ },
  ])("malformed: $what", ({ text, err }) => {
    expect(() => parseDomjobinfoRaw(text)).toThrow(err);
  });

  it("malformed event parameters", () => {
    expect(() => parseJobCompletedEvent("event 'job-completed' for domain 'vm1':\n\tdata_processed: lots\n")).toThrow(
      /virsh event job-completed: data_processed: expected an integer/,
    );
    expect(() => parseJobCompletedEvent("event 'job-completed' for domain 'vm1':\nevents received: 1\n")).toThrow(/virsh event job-completed: output: the event has no parameters/);
  });
});

describe("virsh errors", () => {
  it.each([
    { file: "err-no-domain.txt", kind: "no-domain", text: "failed to get domain 'nosuch'" },
    { file: "err-no-daemon.txt", kind: "no-daemon", text: "failed to connect to the hypervisor: Failed to connect socket to '/tmp/lvp/x/libvirt-sock': No such file or directory" },
    { file: "err-dommemstat-shutoff.txt", kind: "not-running", text: "Failed to get memory statistics for domain vmoff: Requested operation is not valid: domain is not running" },
    { file: "err-migrate-cancelled.txt", kind: "other", text: "operation aborted: job 'migration out' canceled by client" },
    { file: "err-migrate-refused.txt", kind: "other", text: "unable to connect to server at '127.0.0.2:1': Connection refused" },
    { file: "err-domjobabort-postcopy.txt", kind: "other", text: "Requested operation is not valid: cannot abort migration in post-copy mode" },
    { file: "err-domjobinfo-destination.txt", kind: "other", text: "Operation not supported: migration statistics are available only on the source host" },
    { file: "err-setmem-above-max.txt", kind: "other", text: "invalid argument: cannot set memory higher than max memory" },
  ])("$file", (c) => {
    const stderr = fx(c.file);
    expect(classifyVirshError(stderr)).toBe(c.kind);
    expect(cleanVirshError(stderr)).toBe(c.text);
  });

  it("drops virsh's reference-leak warning", () => {
    const tail = fx("event-job-completed.txt").split("\n").slice(-2).join("\n");
    expect(cleanVirshError(tail)).toBe("");
  });
});

describe("the incoming URI a libvirt destination returns", () => {
  it("parses", () => {
    const u = parseIncomingUri(JSON.stringify({ dconnuri: "qemu+unix:///system?socket=/tmp/b/run/libvirt-sock", migrateuri: "tcp://127.0.0.1:49152" }));
    expect(u.migrateuri).toBe("tcp://127.0.0.1:49152");
  });
  it.each([
    { what: "a QMP destination's URI", uri: "tcp:127.0.0.1:4444", err: /libvirt migration URI: expected JSON .* got "tcp:127.0.0.1:4444" \(is the destination a QMP host\?\)/ },
    { what: "an array", uri: "[]", err: /expected a JSON object/ },
    { what: "no dconnuri", uri: '{"migrateuri":"tcp://127.0.0.1:1"}', err: /dconnuri: expected a libvirt URI/ },
    { what: "bad migrateuri", uri: '{"dconnuri":"qemu:///system","migrateuri":"tcp:127.0.0.1:1"}', err: /migrateuri: expected tcp:\/\/HOST:PORT/ },
    { what: "shell in migrateuri", uri: '{"dconnuri":"qemu:///system","migrateuri":"tcp://x;rm -rf /:1"}', err: /migrateuri: expected tcp:\/\/HOST:PORT/ },
    { what: "an extra key", uri: '{"dconnuri":"qemu:///system","migrateuri":"tcp://127.0.0.1:1","p2p":true}', err: /unknown key p2p/ },
  ])("refuses $what", ({ uri, err }) => {
    expect(() => parseIncomingUri(uri)).toThrow(err);
  });
});

describe("the event stream", () => {
  it("host a: the source side of a post-copy migration, then the destination side of a cancelled one", () => {
    const s = new VirshEventStream();
    const text = fx("event-loop-host-a.txt");
    // Fed in odd-sized chunks, as a pipe delivers them.
    const events = [];
    for (let i = 0; i < text.length; i += 37) events.push(...s.push(text.slice(i, i + 37)));
    events.push(...s.flush());
    expect(events.map((e) => (e.kind === "lifecycle" ? `${e.event} ${e.detail}` : e.kind === "migration-iteration" ? `pass ${e.iteration}` : e.kind))).toEqual([
      "pass 1",
      "Suspended Migrated",
      "Suspended Post-copy",
      "pass 2",
      "Stopped Migrated",
      "job-completed",
      "Started Migrated",
      "Stopped Failed",
    ]);
    const done = events.find((e) => e.kind === "job-completed");
    expect(done?.kind === "job-completed" && jobStatsToMigrateStats(done.stats, "completed")).toMatchObject({ totalTimeMs: 2687, downtimeMs: 10, transferredBytes: 100542376, postcopyRequests: 16 });
    expect(events.every((e) => e.domain === "vm1")).toBe(true);
  });

  it("host b: the destination side of a post-copy migration", () => {
    const s = new VirshEventStream();
    const events = [...s.push(fx("event-loop-host-b.txt")), ...s.flush()];
    expect(events.map((e) => (e.kind === "lifecycle" ? `${e.event} ${e.detail}` : e.kind))).toEqual(["Started Migrated", "Resumed Post-copy", "Resumed Migrated", "migration-iteration"]);
  });

  it("a job-completed block at the end of the output waits for flush", () => {
    const s = new VirshEventStream();
    const text = fx("event-job-completed.txt");
    const before = s.push(text.split("events received")[0] as string);
    expect(before).toEqual([]);
    expect(s.hasPending).toBe(true);
    const after = s.flush();
    expect(after).toHaveLength(1);
    expect(s.hasPending).toBe(false);
  });

  it("ignores lines that are not events, keeps other event types by name", () => {
    const s = new VirshEventStream();
    expect(s.push("events received: 1\nerror: One or more references were leaked after disconnect from the hypervisor\n")).toEqual([]);
    expect(s.push("event 'reboot' for domain 'vm1'\n")).toEqual([{ kind: "other", domain: "vm1", type: "reboot" }]);
  });

  it.each([
    { what: "a lifecycle without detail", text: "event 'lifecycle' for domain 'vm1': Stopped\n", err: /virsh event lifecycle: detail: expected "<event> <detail>"/ },
    { what: "a non-numeric iteration", text: "event 'migration-iteration' for domain 'vm1': iteration: 'two'\n", err: /virsh event migration-iteration: iteration: expected "iteration: '<n>'"/ },
    { what: "a bad parameter", text: "event 'job-completed' for domain 'vm1':\n\ttime_elapsed: soon\nevent 'reboot' for domain 'vm1'\n", err: /virsh event job-completed: time_elapsed: expected an integer/ },
  ])("malformed: $what", ({ text, err }) => {
    expect(() => new VirshEventStream().push(text)).toThrow(err);
  });
});
