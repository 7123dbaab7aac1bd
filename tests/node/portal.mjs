#!/usr/bin/env node
// The portal's side of the queue, with the official Node.js BullMQ client, for fsw's Python tests.
//
// For each --selfie it adds a job named `process-face` with the portal's data
// ({image: "data:image/jpeg;base64,...", uid, stage, timestamp}) and the portal's options (JOB_OPTIONS), follows it
// through QueueEvents to the end, and prints one JSON line:
//   {"selfie", "id", "state": "completed"|"failed"|"timeout", "returnvalue"|"failedReason", "progress": [...]}
// --workers prints {"workers": [rawname, ...]} from queue.getWorkers().
// --schemas FILE (the output of `fsw-worker schema`) checks, with Ajv, every job's data against the job
// schema, every result against the result schema and every record of the `workers` hash against the
// heartbeat schema; problems are printed as {"schema_errors": [...]}.
//
// usage: node portal.mjs --redis URL --queue NAME [--stage S] [--uid U] [--selfie PATH]... [--data JSON]
//                        [--timeout MS] [--workers] [--schemas FILE]

import fs from 'node:fs';
import path from 'node:path';
import { Queue, QueueEvents } from 'bullmq';
import { Redis } from 'ioredis';
import Ajv2020 from 'ajv/dist/2020.js';

// The portal's job options: no retry; a completed job kept 24 h (at most 1000), a failed one 7 days, so that
// its result or failure reason can be read back by job id.
const JOB_OPTIONS = {
  attempts: 1,
  removeOnComplete: { age: 24 * 3600, count: 1000 },
  removeOnFail: { age: 7 * 24 * 3600 },
};

function parseArgs(argv) {
  const out = { selfie: [] };
  const flags = new Set(['workers']);
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '');
    if (flags.has(key)) out[key] = true;
    else if (key === 'selfie') out.selfie.push(argv[++i]);
    else out[key] = argv[++i];
  }
  return out;
}

function connectionOf(url) {
  const u = new URL(url);
  const connection = { host: u.hostname, port: Number(u.port || 6379), maxRetriesPerRequest: null };
  if (u.password) connection.password = decodeURIComponent(u.password);
  if (u.protocol === 'rediss:') connection.tls = {};
  return connection;
}

function dataUrl(file) {
  const type = path.extname(file).slice(1).toLowerCase().replace('jpg', 'jpeg') || 'jpeg';
  return `data:image/${type};base64,${fs.readFileSync(file).toString('base64')}`;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const connection = connectionOf(args.redis);
  const timeout = Number(args.timeout ?? 60000);
  const queue = new Queue(args.queue, { connection });
  await queue.waitUntilReady();

  let validators = null;
  const schemaErrors = [];
  if (args.schemas) {
    const all = JSON.parse(fs.readFileSync(args.schemas, 'utf8'));
    const ajv = new Ajv2020({ allErrors: true, strict: false });
    validators = Object.fromEntries(Object.entries(all).map(([name, schema]) => [name, ajv.compile(schema)]));
  }
  const check = (name, value, what) => {
    if (validators && !validators[name](value)) {
      schemaErrors.push({ what, errors: validators[name].errors.map((e) => `${e.instancePath} ${e.message}`) });
    }
  };

  // Read the events stream from its current end, so no event of our jobs can be missed.
  const raw = new Redis(connection);
  const last = await raw.xrevrange(`bull:${args.queue}:events`, '+', '-', 'COUNT', 1);
  const events = new QueueEvents(args.queue, { connection, lastEventId: last.length ? last[0][0] : '0-0' });
  await events.waitUntilReady();
  const progress = new Map();
  events.on('progress', ({ jobId, data }) => {
    if (!progress.has(jobId)) progress.set(jobId, []);
    progress.get(jobId).push(data);
  });

  const jobs = [];
  for (const selfie of args.selfie) {
    const data = {
      image: dataUrl(selfie),
      uid: args.uid ?? 'graduate@example.edu',
      stage: args.stage ?? '',
      timestamp: Date.now(),
      ...(args.data ? JSON.parse(args.data) : {}),
    };
    check('job', data, `job data for ${selfie}`);
    jobs.push({ selfie, job: await queue.add('process-face', data, JOB_OPTIONS) });
  }
  for (const { selfie, job } of jobs) {
    const line = { selfie, id: job.id };
    try {
      line.returnvalue = await job.waitUntilFinished(events, timeout);
      line.state = 'completed';
      check('result', line.returnvalue, `result of job ${job.id}`);
    } catch (err) {
      const state = await job.getState();
      line.state = state === 'failed' ? 'failed' : 'timeout';
      if (state === 'failed') line.failedReason = (await queue.getJob(job.id)).failedReason;
      else line.error = err.message;
    }
    line.progress = progress.get(job.id) ?? [];
    console.log(JSON.stringify(line));
  }

  if (args.workers) {
    const workers = await queue.getWorkers();
    console.log(JSON.stringify({ workers: workers.map((w) => w.rawname) }));
  }
  if (validators) {
    for (const [id, record] of Object.entries(await raw.hgetall('workers'))) {
      check('heartbeat', JSON.parse(record), `heartbeat record ${id}`);
    }
    console.log(JSON.stringify({ schema_errors: schemaErrors }));
  }
  await raw.quit();
  await events.close();
  await queue.close();
}

main().then(
  () => process.exit(0),
  (err) => { process.stderr.write(`portal.mjs: ${err.stack || err}\n`); process.exit(1); },
);
