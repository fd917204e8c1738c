import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { AgentState, Phase } from "../../gen/ballast/v1/common_pb.js";
import { MigrationSchema } from "../../gen/ballast/v1/migration_pb.js";
import { phaseLabel, renderProgress, summarize } from "../../coordinator/progress.js";
import { MiB } from "../../shared/units.js";

const m = (o: Record<string, unknown>) => create(MigrationSchema, { id: "m1", vm: "vm1", destination: "h:1", ...o });

describe("progress rendering", () => {
  it.each([
    [Phase.UNSPECIFIED, 0, "STARTING"],
    [Phase.PREPARE, 0, "PREPARE"],
    [Phase.PRECOPY_PASS, 3, "PRECOPY_PASS 3"],
    [Phase.COMPLETED, 5, "COMPLETED"],
  ])("labels phase %s pass %s as %s", (phase, pass, label) => {
    expect(phaseLabel({ phase, pass })).toBe(label);
  });

  it("draws a bar from sent against sent + left, with balloon and agent", () => {
    const line = renderProgress(
      m({ phase: Phase.PRECOPY_PASS, pass: 1, transferredBytes: BigInt(300 * MiB), remainingBytes: BigInt(100 * MiB), balloon: { actualBytes: BigInt(512 * MiB) }, agentState: AgentState.READY }),
      120,
    );
    expect(line).toContain("[PRECOPY_PASS 1]");
    expect(line).toContain(" 75%");
    expect(line).toContain("sent 300.0 MiB");
    expect(line).toContain("left 100.0 MiB");
    expect(line).toContain("balloon 512.0 MiB");
    expect(line).toContain("agent READY");
    expect(line.length).toBeLessThanOrEqual(120);
  });

  it("summarizes the final numbers of both sides", () => {
    const text = summarize(
      m({ phase: Phase.FAILED, error: "boom", sourceStats: { transferredBytes: BigInt(10 * MiB), totalTimeMs: 1200n, downtimeMs: 7n, dirtySyncCount: 3n, postcopyRequests: 4n }, destinationStats: { postcopyBlocktimeMs: 55n } }),
    );
    expect(text).toContain("FAILED (boom)");
    expect(text).toContain("transferred 10.0 MiB, total-time 1200 ms, downtime 7 ms, passes 3, postcopy-requests 4");
    expect(text).toContain("postcopy-blocktime 55 ms");
  });
});
