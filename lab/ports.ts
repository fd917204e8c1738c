/**
 * Free TCP port picking on 127.0.0.1 for lab processes (guestfwd targets,
 * migration listeners, coordinators). All lab traffic stays on loopback.
 */
import { createServer, type Server } from "node:net";

const LOOPBACK = "127.0.0.1";

function listenEphemeral(): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once("error", reject);
    server.listen({ host: LOOPBACK, port: 0, exclusive: true }, () => resolve(server));
  });
}

function portOf(server: Server): number {
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("ports: listener has no TCP address");
  return addr.port;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/**
 * Returns a TCP port on 127.0.0.1 that was free a moment ago.
 * There is an unavoidable race between closing the probe and the caller
 * binding it; the kernel's ephemeral allocator makes an immediate reuse by a
 * third party unlikely, which is good enough for a lab.
 */
export async function freePort(): Promise<number> {
  const [port] = await freePorts(1);
  if (port === undefined) throw new Error("ports: no port allocated");
  return port;
}

/**
 * Returns `count` distinct free ports on 127.0.0.1. All probes stay open
 * until every port is chosen, so the kernel cannot hand out the same port twice.
 */
export async function freePorts(count: number): Promise<number[]> {
  if (!Number.isInteger(count) || count < 1) throw new RangeError(`ports: count must be a positive integer, got ${count}`);
  const servers: Server[] = [];
  try {
    for (let i = 0; i < count; i++) servers.push(await listenEphemeral());
    return servers.map(portOf);
  } finally {
    await Promise.all(servers.map(close));
  }
}
