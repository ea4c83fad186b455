// The BullMQ worker process of the peer bench: runs noop and lateness jobs,
// records per job id in memory, answers the driver's 'report' messages.
'use strict';
const { Worker } = require('bullmq');

const [queueName, concurrency] = process.argv.slice(2);
const url = new URL(process.env.KAIROS_REDIS_URL || 'redis://127.0.0.1:6379/0');
const connection = { host: url.hostname, port: Number(url.port || 6379) };
const runs = new Map();
const lateness = [];
let lastDone = 0;

const worker = new Worker(queueName, async (job) => {
  const now = Date.now();
  const n = (runs.get(job.id) || 0) + 1;
  runs.set(job.id, n);
  if (n === 1 && job.data.due) lateness.push(now - job.data.due);
  lastDone = Date.now();
}, { connection, concurrency: Number(concurrency) });

worker.waitUntilReady().then(() => process.send('ready'));
process.on('message', () => {
  let duplicated = 0;
  for (const c of runs.values()) if (c > 1) duplicated++;
  process.send({ distinct: runs.size, duplicated, lastDone, lateness });
});
process.on('SIGTERM', () => {
  // Exit even if closing hangs (e.g. Redis gone): never leave a stray worker.
  setTimeout(() => process.exit(1), 5000).unref();
  worker.close().then(() => process.exit(0));
});
// A worker that cannot start must not linger: BullMQ retries forever.
worker.on('error', (e) => {
  console.error('[bullmq worker]', e.message);
  process.exit(1);
});
process.on('disconnect', () => process.exit(0));
