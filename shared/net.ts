/**
 * Small network helpers. Everything Ballast opens in tests and the lab is on
 * loopback; these helpers never pick another address on their own.
 */
import { createServer, type Server } from "node:net";

function listenEphemeral(host: string): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.once("error", reject);
    server.listen({ host, port: 0, exclusive: true }, () => resolve(server));
  });
}

function portOf(server: Server): number {
  const addr = server.address();
  if (addr === null || typeof addr === "string") throw new Error("freePorts: listener has no TCP address");
  return addr.port;
}

function close(server: Server): Promise<void> {
  return new Promise((resolve) => server.close(() => resolve()));
}

/**
 * Returns `count` distinct TCP ports on `host` (default 127.0.0.1) that were
 * free a moment ago. All probes stay open until every port is chosen, so the
 * kernel cannot hand out the same port twice. There is an unavoidable race
 * between closing a probe and the caller binding its port; the kernel's
 * ephemeral allocator makes an immediate reuse by a third party unlikely.
 */
export async function freePorts(count: number, host = "127.0.0.1"): Promise<number[]> {
  if (!Number.isInteger(count) || count < 1) throw new RangeError(`freePorts: count must be a positive integer, got ${count}`);
  const servers: Server[] = [];
  try {
    for (let i = 0; i < count; i++) servers.push(await listenEphemeral(host));
    return servers.map(portOf);
  } finally {
    await Promise.all(servers.map(close));
  }
}

/** Asks the kernel for a free TCP port on `host` (default 127.0.0.1); see {@link freePorts}. */
export async function freePort(host = "127.0.0.1"): Promise<number> {
  const [port] = await freePorts(1, host);
  if (port === undefined) throw new Error("freePort: no port allocated");
  return port;
}

/** Splits "host:port" (or "[v6]:port"); throws RangeError on anything else. */
export function splitHostPort(address: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-_]+):(\d{1,5})$/.exec(address);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port > 0 && port < 65536)) throw new RangeError(`not a host:port address: ${JSON.stringify(address)}`);
  return { host: m[1] as string, port };
}
