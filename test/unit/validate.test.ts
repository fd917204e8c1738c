import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { BalloonStrategy, MigrationMode } from "../../gen/ballast/v1/common_pb.js";
import { MigrateRequestSchema } from "../../gen/ballast/v1/migration_pb.js";
import { DEFAULT_STRATEGY, validateMigrateRequest } from "../../coordinator/validate.js";
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
    ["missing vm", { vm: "" }, "vm: required"],
    ["missing destination", { destination: "" }, "destination: required"],
    ["bad destination", { destination: "nohost" }, "destination: not a host:port"],
    ["bad port", { destination: "h:99999" }, "destination: not a host:port"],
    ["unknown mode", { mode: 42 }, "mode: unknown value 42"],
    ["unknown strategy", { balloonStrategy: 42 }, "balloon_strategy: unknown value 42"],
    ["tiny bandwidth", { maxBandwidthBytesPerSec: 10n }, "below 1000"],
    ["huge bandwidth", { maxBandwidthBytesPerSec: 2n ** 62n }, "out of range"],
    ["long downtime", { downtimeLimitMs: 70_000 }, "downtime_limit_ms"],
    ["long deadline", { prepareDeadlineMs: 700_000 }, "prepare_deadline_ms"],
    ["passes without hybrid", { postcopyAfterPasses: 2 }, "only meaningful with MIGRATION_MODE_HYBRID"],
    ["too many passes", { mode: MigrationMode.HYBRID, postcopyAfterPasses: 101 }, "above 100"],
  ])("rejects %s", (_n, o, message) => {
    expect(() => validateMigrateRequest(req(o), defaults)).toThrow(InvalidArgumentError);
    expect(() => validateMigrateRequest(req(o), defaults)).toThrow(message);
  });
});
