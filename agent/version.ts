/** The agent's version, sent in Hello.agent_version. Kept in step with package.json by hand. */
export const AGENT_VERSION = "0.1.0";
