// BullMQ peer driver: W1 (a burst of noop jobs, end to end) and W2(a)
// (jobs due 2 to 12 s ahead, start lateness), on the same Redis as Kairos.
// The worker runs in its own process (worker.js), as a deployment would,
// and records in memory; it reports through process messages.
'use strict';
const { Queue } = require('bullmq');
const { fork } = require('child_process');
const path = require('path');

const W1 = Number(process.argv[2] || 20000);
const W2 = Number(process.argv[3] || 5000);
const url = new URL(process.env.KAIROS_REDIS_URL || 'redis://127.0.0.1:6379/0');
const connection = { host: url.hostname, port: Number(url.port || 6379) };
const log = (...a) => console.error('[bullmq]', ...a);

function startWorker(queueName, concurrency) {
  const child = fork(path.join(__dirname, 'worker.js'), [queueName, String(concurrency)], {
    env: { ...process.env },
  });
  return new Promise((resolve, reject) => {
    child.once('message', () => resolve(child));
    child.once('exit', (code) => reject(new Error(`worker exited with ${code}`)));
  });
}

function ask(child) {
  return new Promise((resolve, reject) => {
    if (child.exitCode !== null) return reject(new Error('worker exited'));
    child.once('message', resolve);
    child.send('report');
  });
}

async function waitFor(child, n, withinMs) {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const r = await ask(child);
    if (r.distinct >= n || Date.now() > deadline) return r;
    await new Promise((res) => setTimeout(res, 20));
  }
}

function pct(lat) {
  lat.sort((a, b) => a - b);
  const rank = (p) => lat[Math.min(lat.length, Math.max(1, Math.ceil((p / 100) * lat.length))) - 1];
  return lat.length ? { p50: rank(50), p99: rank(99), 'p99.9': rank(99.9), max: lat[lat.length - 1] } : {};
}

async function run(name, n, concurrency, makeJob, withinMs) {
  const queueName = `kb-peer-bullmq-${process.pid}-${name}`;
  const queue = new Queue(queueName, { connection });
  const child = await startWorker(queueName, concurrency);
  const t0 = Date.now();
  for (let i = 0; i < n; i += 1000) {
    const jobs = [];
    for (let j = i; j < Math.min(n, i + 1000); j++) jobs.push(makeJob(j));
    await queue.addBulk(jobs);
  }
  const enq = (Date.now() - t0) / 1000;
  const r = await waitFor(child, n, withinMs);
  child.kill('SIGTERM');
  await queue.obliterate({ force: true }).catch(() => {});
  await queue.close();
  return { t0, enq, r };
}

async function main() {
  const out = { peer: 'bullmq', version: require('bullmq/package.json').version };
  log('W1');
  {
    const { t0, enq, r } = await run('w1', W1, 50, (i) => ({
      name: 'noop',
      data: {},
      opts: { jobId: `n${i}`, removeOnComplete: true },
    }), 60000 + W1 * 10);
    out.w1 = [{ tasks: W1, ran: r.distinct, concurrency: 50, enqueue_per_s: W1 / enq,
      e2e_per_s: r.distinct / ((r.lastDone - t0) / 1000) }];
  }
  log('W2(a)');
  {
    const start = Date.now();
    const { r } = await run('w2', W2, 50, (i) => {
      const due = start + 2000 + Math.floor(Math.random() * 10000);
      return { name: 'late', data: { due },
        opts: { jobId: `t${i}`, delay: Math.max(0, due - Date.now()), removeOnComplete: true } };
    }, 42000);
    out.w2a = { tasks: W2, ran: r.distinct, lateness_ms: pct(r.lateness), lost: W2 - r.distinct,
      duplicated: r.duplicated };
  }
  console.log(JSON.stringify(out));
  process.exit(0);
}

main().catch((e) => { log(e); process.exit(1); });
