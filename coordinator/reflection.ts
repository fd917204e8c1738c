/**
 * Server reflection for `buf curl` and grpcurl: our services (descriptors
 * embedded by protoc-gen-es) plus grpc.health.v1.
 *
 * The health descriptor comes from grpc-health-check via proto-loader, which
 * encodes it the protobufjs way: relative type names and map entries not
 * named `<Field>Entry`. Go-based clients (buf curl) refuse such a file, so it
 * is normalised before it is served.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  FileDescriptorSetSchema,
  type DescriptorProto,
  type FileDescriptorProto,
} from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { loadFileDescriptorSetFromBuffer, loadSync } from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { protoPath as healthProtoPath } from "grpc-health-check";
import { dirname } from "node:path";
import { file_ballast_v1_agent } from "../gen/ballast/v1/agent_pb.js";
import { file_ballast_v1_common } from "../gen/ballast/v1/common_pb.js";
import { file_ballast_v1_migration } from "../gen/ballast/v1/migration_pb.js";
import { file_ballast_v1_peer } from "../gen/ballast/v1/peer_pb.js";
import { file_ballast_v1_vm } from "../gen/ballast/v1/vm_pb.js";

/** Qualifies relative type names and renames map entries, in place. */
export function normalizeDescriptor(file: FileDescriptorProto): FileDescriptorProto {
  const known = new Set<string>();
  const collect = (msgs: DescriptorProto[], scope: string) => {
    for (const m of msgs) {
      known.add(`${scope}.${m.name}`);
      for (const e of m.enumType) known.add(`${scope}.${m.name}.${e.name}`);
      collect(m.nestedType, `${scope}.${m.name}`);
    }
  };
  const pkg = file.package ? `.${file.package}` : "";
  // Map entries must be called <Field>Entry: rename them first so lookups see the new names.
  const renameEntries = (m: DescriptorProto, scope: string) => {
    for (const n of m.nestedType) {
      if (n.options?.mapEntry && !n.name.endsWith("Entry")) {
        const old = n.name;
        n.name = `${old}Entry`;
        for (const f of m.field) if (f.typeName === old || f.typeName === `${scope}.${m.name}.${old}`) f.typeName = `${scope}.${m.name}.${n.name}`;
      }
      renameEntries(n, `${scope}.${m.name}`);
    }
  };
  for (const m of file.messageType) renameEntries(m, pkg);
  for (const e of file.enumType) known.add(`${pkg}.${e.name}`);
  collect(file.messageType, pkg);
  const resolve = (name: string, scope: string): string => {
    if (name === "" || name.startsWith(".")) return name;
    for (let s = scope; ; s = s.slice(0, s.lastIndexOf("."))) {
      if (known.has(`${s}.${name}`)) return `${s}.${name}`;
      if (s === "") return name;
    }
  };
  const fix = (msgs: DescriptorProto[], scope: string) => {
    for (const m of msgs) {
      const inner = `${scope}.${m.name}`;
      for (const f of m.field) f.typeName = resolve(f.typeName, inner);
      fix(m.nestedType, inner);
    }
  };
  fix(file.messageType, pkg);
  for (const s of file.service) for (const meth of s.method) {
    meth.inputType = resolve(meth.inputType, pkg);
    meth.outputType = resolve(meth.outputType, pkg);
  }
  return file;
}

function healthDescriptor(): FileDescriptorProto {
  const def = loadSync("health/v1/health.proto", { includeDirs: [dirname(dirname(dirname(healthProtoPath)))] });
  const entry = def["grpc.health.v1.HealthCheckRequest"] as { fileDescriptorProtos?: Buffer[] } | undefined;
  const bin = entry?.fileDescriptorProtos?.[0];
  if (!bin) throw new Error("grpc-health-check: health descriptor not found");
  const file = normalizeDescriptor(fromBinary(FileDescriptorProtoSchema, bin));
  file.name = "grpc/health/v1/health.proto";
  return file;
}

/** Adds server reflection (v1 and v1alpha) for every service the coordinator serves. */
export function addReflection(server: grpc.Server): void {
  const files = [file_ballast_v1_common, file_ballast_v1_agent, file_ballast_v1_migration, file_ballast_v1_vm, file_ballast_v1_peer].map((f) => f.proto);
  const set = create(FileDescriptorSetSchema, { file: [...files, healthDescriptor()] });
  new ReflectionService(loadFileDescriptorSetFromBuffer(Buffer.from(toBinary(FileDescriptorSetSchema, set)))).addToServer(server);
}
