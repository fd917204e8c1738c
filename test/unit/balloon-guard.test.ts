import { describe, expect, it } from "vitest";
import { BalloonReason, Phase } from "../../gen/ballast/v1/common_pb.js";
import { guardBalloonRequest, type GuardState } from "../../coordinator/balloon-guard.js";
import { MiB } from "../../shared/units.js";

const base: GuardState = { floorBytes: 256 * MiB, maxBytes: 1024 * MiB, currentTargetBytes: 800 * MiB };
const migrating = (phase: Phase, direction: "outgoing" | "incoming" = "outgoing"): GuardState => ({ ...base, migration: { id: "m1", phase, direction } });

describe("guardBalloonRequest", () => {
  it.each([
    // [name, target MiB, reason, migration id, state, accept, applied MiB, force]
    ["steady shrink outside migration", 600, BalloonReason.STEADY_STATE, "", base, true, 600, false],
    ["steady grow is forced past the rate limit", 900, BalloonReason.STEADY_STATE, "", base, true, 900, true],
    ["steady below floor is clamped", 100, BalloonReason.STEADY_STATE, "", base, true, 256, false],
    ["steady above max is clamped", 4096, BalloonReason.STEADY_STATE, "", base, true, 1024, true],
    ["steady shrink during pre-copy is refused", 600, BalloonReason.STEADY_STATE, "", migrating(Phase.PRECOPY_PASS), false, 0, false],
    ["steady grow during pre-copy is fine", 900, BalloonReason.STEADY_STATE, "", migrating(Phase.PRECOPY_PASS), true, 900, true],
    ["steady shrink after the migration completed", 600, BalloonReason.STEADY_STATE, "", migrating(Phase.COMPLETED), true, 600, false],
    ["prepare for the running migration", 400, BalloonReason.PREPARE, "m1", migrating(Phase.PREPARE), true, 400, true],
    ["prepare during the first pass (overlap)", 400, BalloonReason.PREPARE, "m1", migrating(Phase.PRECOPY_PASS), true, 400, true],
    ["prepare naming another migration", 400, BalloonReason.PREPARE, "m2", migrating(Phase.PREPARE), false, 0, false],
    ["prepare with no migration", 400, BalloonReason.PREPARE, "m1", base, false, 0, false],
    ["prepare on the incoming side", 400, BalloonReason.PREPARE, "m1", migrating(Phase.PREPARE, "incoming"), false, 0, false],
    ["prepare during post-copy", 400, BalloonReason.PREPARE, "m1", migrating(Phase.POSTCOPY_ACTIVE), false, 0, false],
    ["demand grow during post-copy", 1000, BalloonReason.DEMAND, "m1", migrating(Phase.POSTCOPY_ACTIVE, "incoming"), true, 1000, true],
    ["demand that would shrink", 500, BalloonReason.DEMAND, "", base, false, 0, false],
    ["restore grow", 1024, BalloonReason.RESTORE, "", migrating(Phase.COMPLETED), true, 1024, true],
    ["restore shrink during a migration", 500, BalloonReason.RESTORE, "", migrating(Phase.PRECOPY_PASS), false, 0, false],
    ["zero target", 0, BalloonReason.STEADY_STATE, "", base, false, 0, false],
    ["unknown reason", 600, 99 as BalloonReason, "", base, false, 0, false],
    ["unspecified reason", 600, BalloonReason.UNSPECIFIED, "", base, false, 0, false],
  ] as const)("%s", (_name, mib, reason, id, state, accept, applied, force) => {
    const v = guardBalloonRequest({ targetBytes: mib * MiB, reason, migrationId: id }, state);
    expect(v.accept).toBe(accept);
    if (v.accept) {
      expect(v.targetBytes).toBe(applied * MiB);
      expect(v.force).toBe(force);
    } else {
      expect(v.why.length).toBeGreaterThan(0);
    }
  });

  it("reports clamping", () => {
    const v = guardBalloonRequest({ targetBytes: 1, reason: BalloonReason.STEADY_STATE, migrationId: "" }, base);
    expect(v).toMatchObject({ accept: true, clamped: true, targetBytes: 256 * MiB });
  });
});
