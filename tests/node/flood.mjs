#!/usr/bin/env node
// Overload from the portal's side: --count jobs at once with the official Node.js BullMQ client.
//
// Adds `count` portal-shaped `process-face` jobs ({image: data URL, uid, stage, timestamp}, {attempts: 1})
// with queue.addBulk in chunks, waits through QueueEvents until every one has completed or failed (or
// --timeout ms pass), and prints one JSON line:
//   {"ids": [...], "completed": n, "failed": n, "pending": n, "add_ms": ms to add them all}
// Latencies are left to the caller, which reads each job's timestamp/processedOn/finishedOn from Redis.
//
// usage: node flood.mjs --redis URL --queue NAME --selfie PATH --count N [--stage S] [--timeout MS]

import fs from 'node:fs';
import path from 'node:path';
import { Queue, QueueEvents } from 'bullmq';
import { Redis } from 'ioredis';

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  return out;
}

function connectionOf(url) {
  const u = new URL(url);
  const connection = { host: u.hostname, port: Number(u.port || 6379), maxRetriesPerRequest: null };
  if (u.password) connection.password = decodeURIComponent(u.password);
  if (u.protocol === 'rediss:') connection.tls = {};
  return connection;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const connection = connectionOf(args.redis);
  const count = Number(args.count);
  const timeout = Number(args.timeout ?? 600000);
  const type = path.extname(args.selfie).slice(1).toLowerCase().replace('jpg', 'jpeg') || 'jpeg';
  const image = `data:image/${type};base64,${fs.readFileSync(args.selfie).toString('base64')}`;

  const queue = new Queue(args.queue, { connection });
  await queue.waitUntilReady();
  const raw = new Redis(connection);
  const last = await raw.xrevrange(`bull:${args.queue}:events`, '+', '-', 'COUNT', 1);
  const events = new QueueEvents(args.queue, { connection, lastEventId: last.length ? last[0][0] : '0-0' });
  await events.waitUntilReady();

  const ended = new Map();
  let resolveAll;
  const allEnded = new Promise((resolve) => { resolveAll = resolve; });
  let ids = null;
  const settle = (jobId, state) => {
    if (!ended.has(jobId)) ended.set(jobId, state);
    if (ids && ids.every((id) => ended.has(id))) resolveAll();
  };
  events.on('completed', ({ jobId }) => settle(jobId, 'completed'));
  events.on('failed', ({ jobId }) => settle(jobId, 'failed'));

  const started = Date.now();
  const added = [];
  for (let i = 0; i < count; i += 500) {
    const chunk = [];
    for (let k = i; k < Math.min(count, i + 500); k++) {
      const data = { image, uid: `graduate${k}@example.edu`, stage: args.stage ?? '', timestamp: Date.now() };
      chunk.push({ name: 'process-face', data, opts: { attempts: 1 } });
    }
    added.push(...(await queue.addBulk(chunk)));
  }
  const addMs = Date.now() - started;
  ids = added.map((job) => job.id);
  if (ids.every((id) => ended.has(id))) resolveAll();
  await Promise.race([allEnded, new Promise((resolve) => setTimeout(resolve, timeout))]);

  const states = ids.map((id) => ended.get(id) ?? 'pending');
  const n = (s) => states.filter((x) => x === s).length;
  console.log(JSON.stringify({ ids, completed: n('completed'), failed: n('failed'), pending: n('pending'), add_ms: addMs }));
  await raw.quit();
  await events.close();
  await queue.close();
}

main().then(
  () => process.exit(0),
  (err) => { process.stderr.write(`flood.mjs: ${err.stack || err}\n`); process.exit(1); },
);
