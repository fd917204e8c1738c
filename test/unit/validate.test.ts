import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode } from "../../gen/ballast/v1/common_pb.js";
import { MigrateRequestSchema } from "../../gen/ballast/v1/migration_pb.js";
import { DEFAULT_STRATEGY, requireId, validateMigrateRequest } from "../../coordinator/validate.js";
import { InvalidArgumentError } from "../../shared/errors.js";

const defaults = { maxBandwidthBytesPerSec: 125_000_000, downtimeLimitMs: 300, prepareDeadlineMs: 15_000, steadyState: true, sampleIntervalMs: 1000, agentLeaseMs: 10_000 };
const req = (o: Record<string, unknown>) => create(MigrateRequestSchema, { vm: "vm1", destination: "127.0.0.1:7000", ...o });

describe("validateMigrateRequest", () => {
  it("applies defaults", () => {
    expect(validateMigrateRequest(req({}), defaults)).toEqual({
      vm: "vm1",
      destination: "127.0.0.1:7000",
      mode: MigrationMode.PRECOPY,
      strategy: DEFAULT_STRATEGY,
      maxBandwidthBytesPerSec: 125_000_000,
      downtimeLimitMs: 300,
      prepareDeadlineMs: 15_000,
      postcopyAfterPasses: 1,
    });
  });

  it("keeps explicit values", () => {
    const p = validateMigrateRequest(
      req({ mode: MigrationMode.HYBRID, balloonStrategy: BalloonStrategy.OVERLAP, maxBandwidthBytesPerSec: 5000n, downtimeLimitMs: 50, prepareDeadlineMs: 100, postcopyAfterPasses: 3 }),
      defaults,
    );
    expect(p).toMatchObject({ mode: MigrationMode.HYBRID, strategy: BalloonStrategy.OVERLAP, maxBandwidthBytesPerSec: 5000, downtimeLimitMs: 50, prepareDeadlineMs: 100, postcopyAfterPasses: 3 });
  });

  it.each([
    ["missing vm", { vm: "" }, "vm", "a VM name is required"],
    ["missing destination", { destination: "" }, "destination", "--to HOST:PORT (the destination coordinator) is required"],
    ["bad destination", { destination: "nohost" }, "destination", '--to: not a host:port address: "nohost"'],
    ["bad port", { destination: "h:99999" }, "destination", "--to: not a host:port"],
    ["unknown mode", { mode: 42 }, "mode", "--mode: unknown value 42"],
    ["unknown strategy", { balloonStrategy: 42 }, "balloon_strategy", "--strategy: unknown value 42"],
    ["tiny bandwidth", { maxBandwidthBytesPerSec: 10n }, "max_bandwidth_bytes_per_sec", "--bandwidth: 10 bytes/s is below the minimum of 1000 bytes/s"],
    ["huge bandwidth", { maxBandwidthBytesPerSec: 2n ** 62n }, "max_bandwidth_bytes_per_sec", "--bandwidth: 4611686018427387904 bytes/s is out of range"],
    ["long downtime", { downtimeLimitMs: 70_000 }, "downtime_limit_ms", "--downtime-ms: 70000 is above the maximum of 60000"],
    ["long deadline", { prepareDeadlineMs: 700_000 }, "prepare_deadline_ms", "--prepare-deadline-ms: 700000 is above the maximum of 600000"],
    ["passes without hybrid", { postcopyAfterPasses: 2 }, "postcopy_after_passes", "--postcopy-after applies only to --mode hybrid"],
    ["too many passes", { mode: MigrationMode.HYBRID, postcopyAfterPasses: 101 }, "postcopy_after_passes", "--postcopy-after: 101 is above the maximum of 100"],
  ])("rejects %s, naming the proto field and the ballastctl flag", (_n, o, field, message) => {
    let err: unknown;
    try {
      validateMigrateRequest(req(o), defaults);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(InvalidArgumentError);
    const e = err as InvalidArgumentError;
    expect(e.message).toContain(message);
    expect(e.violations).toEqual([{ field, description: e.message }]);
    // The messages speak the CLI's language, not the proto's.
    expect(e.message).not.toMatch(/MIGRATION_MODE_|BALLOON_STRATEGY_|_ms:|_bytes_per_sec:/);
  });
});

describe("requireId", () => {
  it.each([
    ["id", "a migration id is required (id)"],
    ["migration_id", "a migration id is required (migration_id)"],
    ["name", "a VM name is required (name)"],
  ])("names the missing %s field", (field, message) => {
    expect(requireId("x", field)).toBe("x");
    expect(() => requireId("", field)).toThrow(message);
    try {
      requireId("", field);
    } catch (e) {
      expect((e as InvalidArgumentError).violations).toEqual([{ field, description: message }]);
    }
  });
});
