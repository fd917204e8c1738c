/**
 * BalloonController against a fake balloon device whose guest "driver" moves
 * the actual size as each test scripts it. Real timers with short intervals.
 */
import { describe, expect, it } from "vitest";
import { BalloonController, type BalloonControllerOptions, type BalloonDevice, type BalloonState } from "../../coordinator/balloon-controller.js";
import { QmpCommandError, QmpDisconnectedError } from "../../coordinator/qmp-client.js";
import { FailedPreconditionError, InvalidArgumentError } from "../../shared/errors.js";
import { MiB } from "../../shared/units.js";

const RAM = 1024 * MiB;

class FakeDevice implements BalloonDevice {
  readonly balloonCalls: Array<{ value: number; atMs: number }> = [];
  queries = 0;
  actual = RAM;
  /** Called on every query-balloon; may move `actual` or throw. */
  onQuery: (fake: FakeDevice) => void = () => undefined;
  failBalloon: Error | undefined;
  private readonly t0 = performance.now();

  async setBalloon(value: number): Promise<void> {
    this.balloonCalls.push({ value, atMs: performance.now() - this.t0 });
    await Promise.resolve();
    if (this.failBalloon) throw this.failBalloon;
  }

  async queryBalloon(): Promise<number> {
    this.queries++;
    this.onQuery(this);
    return this.actual;
  }
}

function make(opts: Partial<BalloonControllerOptions> = {}): { fake: FakeDevice; ctl: BalloonController; states: BalloonState[] } {
  const fake = new FakeDevice();
  const ctl = new BalloonController(fake, { floorBytes: 256 * MiB, maxBytes: RAM, minIntervalMs: 0, pollIntervalMs: 10, stallMs: 100, ...opts });
  const states: BalloonState[] = [];
  ctl.on("state", (s: BalloonState) => states.push(s));
  return { fake, ctl, states };
}

/** Moves actual toward the latest balloon target by `step` bytes per query. */
function converge(step: number): (f: FakeDevice) => void {
  return (f) => {
    const target = f.balloonCalls[f.balloonCalls.length - 1]?.value ?? f.actual;
    const d = target - f.actual;
    f.actual += Math.sign(d) * Math.min(Math.abs(d), step);
  };
}

describe("construction", () => {
  const bad: Array<{ label: string; opts: Partial<BalloonControllerOptions>; match: RegExp }> = [
    { label: "floor above max", opts: { floorBytes: 2 * RAM, maxBytes: RAM }, match: /floorBytes .* is above maxBytes/ },
    { label: "floor of 0 (QEMU rejects a 0 target)", opts: { floorBytes: 0 }, match: /floorBytes must be > 0/ },
    { label: "negative max", opts: { maxBytes: -1 }, match: /maxBytes must be a finite, non-negative/ },
    { label: "NaN floor", opts: { floorBytes: Number.NaN }, match: /floorBytes/ },
    { label: "infinite max", opts: { maxBytes: Number.POSITIVE_INFINITY }, match: /maxBytes/ },
    { label: "zero poll interval", opts: { pollIntervalMs: 0 }, match: /pollIntervalMs must be a positive/ },
    { label: "negative rate limit", opts: { minIntervalMs: -5 }, match: /minIntervalMs/ },
    { label: "negative tolerance", opts: { toleranceBytes: -1 }, match: /toleranceBytes/ },
  ];
  it.each(bad)("rejects $label", ({ opts, match }) => {
    expect(() => make(opts)).toThrow(InvalidArgumentError);
    expect(() => make(opts)).toThrow(match);
  });

  it("accepts floor == max", () => {
    const { ctl } = make({ floorBytes: RAM, maxBytes: RAM });
    expect(ctl.clamp(0)).toBe(RAM);
  });
});

describe("clamp", () => {
  const { ctl } = make();
  const cases: Array<[number, number]> = [
    [0, 256 * MiB],
    [100 * MiB, 256 * MiB],
    [256 * MiB, 256 * MiB],
    [512 * MiB, 512 * MiB],
    [512 * MiB + 0.75, 512 * MiB],
    [RAM, RAM],
    [RAM + 1, RAM],
    [Number.MAX_SAFE_INTEGER, RAM],
  ];
  it.each(cases)("clamp(%d) = %d", (input, want) => {
    expect(ctl.clamp(input)).toBe(want);
  });
  it.each([Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, -1])("clamp(%d) throws InvalidArgumentError", (v) => {
    expect(() => ctl.clamp(v)).toThrow(InvalidArgumentError);
  });
});

describe("setTarget", () => {
  it("clamps, issues QMP balloon, records the target and emits state", async () => {
    const { fake, ctl, states } = make();
    await expect(ctl.setTarget(100 * MiB, { reason: "test" })).resolves.toBe(256 * MiB);
    expect(fake.balloonCalls.map((c) => c.value)).toEqual([256 * MiB]);
    expect(ctl.targetBytes).toBe(256 * MiB);
    expect(states).toEqual([{ targetBytes: 256 * MiB, actualBytes: undefined }]);
  });

  it.each([Number.NaN, -1, Number.POSITIVE_INFINITY])("rejects %d without calling QEMU", async (v) => {
    const { fake, ctl } = make();
    await expect(ctl.setTarget(v)).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(fake.balloonCalls).toHaveLength(0);
  });

  it("propagates a QMP failure and leaves the previous target in place", async () => {
    const { fake, ctl } = make();
    await ctl.setTarget(512 * MiB);
    fake.failBalloon = new QmpCommandError("balloon", "DeviceNotActive", "No balloon device has been activated");
    await expect(ctl.setTarget(300 * MiB)).rejects.toBeInstanceOf(QmpCommandError);
    expect(ctl.targetBytes).toBe(512 * MiB);
  });

  it("coalesces non-forced requests inside minIntervalMs and applies only the latest when the interval ends", async () => {
    const { fake, ctl } = make({ minIntervalMs: 120 });
    await ctl.setTarget(900 * MiB);
    const coalesced = [ctl.setTarget(800 * MiB), ctl.setTarget(700 * MiB), ctl.setTarget(600 * MiB)];
    await new Promise((r) => setTimeout(r, 40));
    expect(fake.balloonCalls).toHaveLength(1);
    await expect(Promise.all(coalesced)).resolves.toEqual([600 * MiB, 600 * MiB, 600 * MiB]);
    expect(fake.balloonCalls.map((c) => c.value)).toEqual([900 * MiB, 600 * MiB]);
    const gap = fake.balloonCalls[1]!.atMs - fake.balloonCalls[0]!.atMs;
    expect(gap).toBeGreaterThanOrEqual(110);
    expect(ctl.targetBytes).toBe(600 * MiB);
  });

  it("applies immediately again once the interval has passed", async () => {
    const { fake, ctl } = make({ minIntervalMs: 50 });
    await ctl.setTarget(900 * MiB);
    await new Promise((r) => setTimeout(r, 70));
    await ctl.setTarget(800 * MiB);
    expect(fake.balloonCalls).toHaveLength(2);
  });

  it("force bypasses the rate limit and supersedes a scheduled request", async () => {
    const { fake, ctl } = make({ minIntervalMs: 200 });
    await ctl.setTarget(900 * MiB);
    const scheduled = ctl.setTarget(700 * MiB);
    const t0 = performance.now();
    await expect(ctl.setTarget(400 * MiB, { force: true, reason: "prepare" })).resolves.toBe(400 * MiB);
    expect(performance.now() - t0).toBeLessThan(180); // well under the 200 ms interval
    // The superseded caller learns what is actually applied now.
    await expect(scheduled).resolves.toBe(400 * MiB);
    await new Promise((r) => setTimeout(r, 250));
    expect(fake.balloonCalls.map((c) => c.value)).toEqual([900 * MiB, 400 * MiB]);
    expect(ctl.targetBytes).toBe(400 * MiB);
  });

  it("a forced apply also restarts the interval for later non-forced requests", async () => {
    const { fake, ctl } = make({ minIntervalMs: 100 });
    await ctl.setTarget(400 * MiB, { force: true });
    const p = ctl.setTarget(500 * MiB);
    await new Promise((r) => setTimeout(r, 30));
    expect(fake.balloonCalls).toHaveLength(1);
    await expect(p).resolves.toBe(500 * MiB);
    expect(fake.balloonCalls).toHaveLength(2);
  });

  it("rejects every coalesced caller when the delayed apply fails", async () => {
    const { fake, ctl } = make({ minIntervalMs: 60 });
    await ctl.setTarget(900 * MiB);
    fake.failBalloon = new QmpDisconnectedError("gone");
    const ps = [ctl.setTarget(800 * MiB), ctl.setTarget(700 * MiB)];
    for (const p of ps) await expect(p).rejects.toBeInstanceOf(QmpDisconnectedError);
  });

  it("dispose cancels a scheduled request and ignores later balloon-change reports", async () => {
    const { fake, ctl, states } = make({ minIntervalMs: 60 });
    await ctl.setTarget(900 * MiB);
    const scheduled = ctl.setTarget(500 * MiB);
    ctl.dispose();
    await expect(scheduled).rejects.toBeInstanceOf(FailedPreconditionError);
    await new Promise((r) => setTimeout(r, 100));
    expect(fake.balloonCalls).toHaveLength(1);
    const before = states.length;
    ctl.learnActual(600 * MiB);
    expect(ctl.actualBytes).toBeUndefined();
    expect(states).toHaveLength(before);
    await expect(ctl.setTarget(500 * MiB)).rejects.toBeInstanceOf(FailedPreconditionError);
    ctl.dispose(); // idempotent
  });
});

describe("actual size tracking", () => {
  it("learns actual from balloon-change reports (learnActual) without polling and emits state only on change", async () => {
    const { fake, ctl, states } = make();
    ctl.learnActual(900 * MiB);
    ctl.learnActual(900 * MiB);
    ctl.learnActual("bogus" as unknown as number);
    ctl.learnActual(-5);
    ctl.learnActual(Number.NaN);
    ctl.learnActual(900.5 * MiB + 0.25);
    expect(ctl.actualBytes).toBe(900 * MiB);
    expect(states).toEqual([{ targetBytes: undefined, actualBytes: 900 * MiB }]);
    expect(fake.queries).toBe(0);
  });

  it("refresh() queries QEMU", async () => {
    const { fake, ctl } = make();
    fake.actual = 777 * MiB;
    await expect(ctl.refresh()).resolves.toBe(777 * MiB);
    expect(ctl.actualBytes).toBe(777 * MiB);
  });
});

describe("waitForTarget", () => {
  it("reports reached once actual is within tolerance, with progress callbacks", async () => {
    const { fake, ctl } = make({ toleranceBytes: 8 * MiB });
    fake.onQuery = converge(200 * MiB);
    await ctl.setTarget(400 * MiB);
    const progress: number[] = [];
    const r = await ctl.waitForTarget({ deadlineMs: 2000, onProgress: (a) => progress.push(a / MiB) });
    expect(r).toMatchObject({ reached: true, stalled: false, timedOut: false, actualBytes: 400 * MiB, targetBytes: 400 * MiB });
    expect(progress).toEqual([824, 624, 424, 400]);
    expect(r.elapsedMs).toBeLessThan(1000);
  });

  it("returns at once when already there", async () => {
    const { fake, ctl } = make();
    await ctl.setTarget(RAM);
    const r = await ctl.waitForTarget({ deadlineMs: 1000 });
    expect(r).toMatchObject({ reached: true, actualBytes: RAM });
    expect(fake.queries).toBe(1);
  });

  it("reports stalled when actual stops moving (e.g. no guest driver), without throwing", async () => {
    const { ctl } = make({ stallMs: 100 });
    await ctl.setTarget(300 * MiB);
    const r = await ctl.waitForTarget({ deadlineMs: 5000 });
    expect(r).toMatchObject({ reached: false, stalled: true, timedOut: false, actualBytes: RAM, targetBytes: 300 * MiB });
    expect(r.elapsedMs).toBeGreaterThanOrEqual(95);
    expect(r.elapsedMs).toBeLessThan(1000);
  });

  it("counts deflate-on-oom oscillation near the limit as stalled", async () => {
    const { fake, ctl } = make({ stallMs: 120 });
    await ctl.setTarget(300 * MiB);
    const seq = [900, 800, 766, 767, 766, 768, 766, 767, 766, 767, 766, 768];
    fake.onQuery = (f) => {
      f.actual = (seq[Math.min(f.queries - 1, seq.length - 1)] ?? 766) * MiB;
    };
    const r = await ctl.waitForTarget({ deadlineMs: 5000 });
    expect(r).toMatchObject({ reached: false, stalled: true, timedOut: false, actualBytes: expect.any(Number) });
    expect(r.actualBytes).toBeGreaterThanOrEqual(766 * MiB);
  });

  it("reports timedOut when progress continues but the deadline passes", async () => {
    const { fake, ctl } = make({ stallMs: 10_000 });
    fake.onQuery = converge(1 * MiB);
    await ctl.setTarget(300 * MiB);
    const r = await ctl.waitForTarget({ deadlineMs: 120 });
    expect(r).toMatchObject({ reached: false, stalled: false, timedOut: true, targetBytes: 300 * MiB });
    expect(r.elapsedMs).toBeGreaterThanOrEqual(115);
    expect(r.actualBytes).toBeLessThan(RAM);
  });

  it("deadlineMs 0 checks once", async () => {
    const { fake, ctl } = make();
    await ctl.setTarget(300 * MiB);
    const r = await ctl.waitForTarget({ deadlineMs: 0 });
    expect(r).toMatchObject({ reached: false, timedOut: true });
    expect(fake.queries).toBe(1);
  });

  it("rides out QMP disconnects while polling", async () => {
    const { fake, ctl } = make({ stallMs: 1000 });
    await ctl.setTarget(400 * MiB);
    const step = converge(300 * MiB);
    fake.onQuery = (f) => {
      if (f.queries === 2 || f.queries === 3) throw new QmpDisconnectedError("QMP reconnecting");
      step(f);
    };
    const r = await ctl.waitForTarget({ deadlineMs: 2000 });
    expect(r.reached).toBe(true);
    expect(fake.queries).toBeGreaterThanOrEqual(5);
  });

  it("throws QMP command errors (no balloon device) instead of polling on", async () => {
    const { fake, ctl } = make();
    await ctl.setTarget(400 * MiB);
    fake.onQuery = () => {
      throw new QmpCommandError("query-balloon", "DeviceNotActive", "No balloon device has been activated");
    };
    await expect(ctl.waitForTarget({ deadlineMs: 1000 })).rejects.toBeInstanceOf(QmpCommandError);
  });

  it("follows a target changed during the wait", async () => {
    const { fake, ctl } = make({ stallMs: 1000 });
    fake.onQuery = converge(100 * MiB);
    await ctl.setTarget(300 * MiB);
    const waiting = ctl.waitForTarget({ deadlineMs: 3000 });
    await new Promise((r) => setTimeout(r, 25));
    await ctl.setTarget(800 * MiB, { force: true });
    const r = await waiting;
    expect(r).toMatchObject({ reached: true, targetBytes: 800 * MiB, actualBytes: 800 * MiB });
  });

  it("throws the abort reason when the signal fires", async () => {
    const { ctl } = make({ stallMs: 10_000 });
    await ctl.setTarget(300 * MiB);
    const ac = new AbortController();
    setTimeout(() => ac.abort(new Error("migration cancelled")), 40);
    const t0 = performance.now();
    await expect(ctl.waitForTarget({ deadlineMs: 5000, signal: ac.signal })).rejects.toThrow("migration cancelled");
    expect(performance.now() - t0).toBeLessThan(500);
  });

  it("needs a target and a sane deadline", async () => {
    const { ctl } = make();
    await expect(ctl.waitForTarget({ deadlineMs: 100 })).rejects.toBeInstanceOf(FailedPreconditionError);
    await ctl.setTarget(300 * MiB);
    await expect(ctl.waitForTarget({ deadlineMs: -1 })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(ctl.waitForTarget({ deadlineMs: Number.NaN })).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});
