// node-redis through O7s's Redis port (tests/test_redis_node.py): plain commands, a pipeline, MULTI/EXEC
// and Pub/Sub. Usage: node node_redis.js redis://ORG:PASSWORD@HOST:PORT ; prints one JSON line of results.
import { createClient } from "redis";

const url = process.argv[2];
const out = {};
const client = createClient({ url, socket: { reconnectStrategy: false, connectTimeout: 10000 } });
client.on("error", (e) => { out.client_error = String(e); });
await client.connect();
const tag = `node:${process.pid}`;

out.set = await client.set(`${tag}:k`, "v1");
out.get = await client.get(`${tag}:k`);
await client.hSet(`${tag}:h`, { a: "1", b: "2" });
out.hgetall = await client.hGetAll(`${tag}:h`);
out.keys = (await client.keys(`${tag}:*`)).sort();

// a pipeline: many commands in one write, no transaction
const pipe = client.multi();
for (let i = 0; i < 100; i++) pipe.set(`${tag}:p${i}`, String(i));
pipe.get(`${tag}:p99`);
const piped = await pipe.execAsPipeline();
out.pipeline_len = piped.length;
out.pipeline_last = piped[piped.length - 1];

// MULTI/EXEC
out.multi = await client.multi().incr(`${tag}:n`).incr(`${tag}:n`).get(`${tag}:n`).exec();

// errors keep the connection usable
try {
  await client.incr(`${tag}:k`);
  out.incr_error = null;
} catch (e) {
  out.incr_error = String(e.message);
}
try {
  await client.sendCommand(["FLUSHALL"]);
  out.flushall = null;
} catch (e) {
  out.flushall = String(e.message);
}

// Pub/Sub on a second connection
const sub = client.duplicate();
sub.on("error", (e) => { out.sub_error = String(e); });
await sub.connect();
const got = new Promise((resolve) => {
  sub.subscribe(`${tag}:ch`, (message, channel) => resolve([channel, message]));
});
await new Promise((r) => setTimeout(r, 200));
out.published = await client.publish(`${tag}:ch`, "hello");
out.message = await Promise.race([got, new Promise((r) => setTimeout(() => r(null), 5000))]);
out.tag = tag;
await sub.quit();
const keys = await client.keys(`${tag}:*`);
out.deleted = keys.length ? await client.del(keys) : 0;
await client.quit();
console.log(JSON.stringify(out));
