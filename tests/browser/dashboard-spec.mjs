// The dashboard page against a stand-in API that answers with the JSON of
// docs/HTTP.md (including routes a scheduler may not have yet), full of
// markup where data goes: the page must render it all as text, send the
// token and JSON content types, and drive the actions (queue resume, task
// cancel, dead-letter replay). Run by tests/tests/dashboard.rs.
//
// Environment: KAIROS_UI_DIR (scheduler/src/api/ui), KAIROS_CHROMIUM,
// KAIROS_NODE_MODULES.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (tests/tests/dashboard.rs sets it)`);
  return v;
}
const require = createRequire(path.join(env('KAIROS_NODE_MODULES'), 'x.js'));
const { chromium } = require('playwright-core');
const dir = env('KAIROS_UI_DIR');

const TOKEN = 'spec-token-0123456789';
// Where data goes, markup that would run if the page ever parsed it.
const EVIL = '<img src=x onerror="window.__xss=1">';
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; " +
  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const FILES = {
  '/': ['index.html', 'text/html'], '/ui/app.js': ['app.js', 'text/javascript'],
  '/ui/style.css': ['style.css', 'text/css'], '/ui/favicon.svg': ['favicon.svg', 'image/svg+xml'],
};

const now = Date.now();
const calls = [];
const api = {
  paused: true,
  dead: [{ id: 'd1', name: EVIL, queue: 'reports', attempt: 3, error: EVIL, failed_at: now - 60000 }],
  t1: 'running',
  t2: 'scheduled',
  stream: null,
};

function status(id, state) {
  return {
    id, state, name: EVIL, queue: 'default', priority: 0, attempt: 1, due_at: now + 60000,
    enqueued_at: now - 2000, started_at: state === 'scheduled' ? null : now - 1000,
    finished_at: state === 'succeeded' ? Date.now() : null, error: null, worker: 'host:42',
    schedule_id: null, progress: 60, progress_message: EVIL, result: state === 'succeeded' ? { html: EVIL } : null,
  };
}

function answer(req, res, body) {
  const u = new URL(req.url, 'http://x');
  const send = (code, v) => {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify(v));
  };
  if (FILES[u.pathname] && req.method === 'GET') {
    res.writeHead(200, { 'content-type': FILES[u.pathname][1], 'content-security-policy': CSP });
    return res.end(fs.readFileSync(path.join(dir, FILES[u.pathname][0])));
  }
  if (req.headers.authorization !== `Bearer ${TOKEN}`) return send(401, { error: 'missing or wrong token' });
  if (req.method === 'POST' && req.headers['content-type'] !== 'application/json') {
    return send(415, { error: 'JSON only', field: 'content-type' });
  }
  calls.push(`${req.method} ${u.pathname}${body ? ` ${body}` : ''}`);
  const route = `${req.method} ${u.pathname}`;
  switch (route) {
    case 'GET /v1/queues':
      return send(200, {
        queues: [
          { name: 'default', ready: 0, consumers: 2, delayed: 1, due: 0, dead: 0, paused: false, rates: { enqueued: 120, succeeded: 118, failed: 2, dead: 0 } },
          { name: 'reports', ready: 5, consumers: 0, delayed: 1, due: 0, dead: 1, paused: api.paused, rates: { enqueued: 6, succeeded: 0, failed: 0, dead: 0 } },
        ],
        delay_queue: { waiting: 2, due: 0 },
      });
    case 'POST /v1/queues/reports/resume':
      api.paused = false;
      return send(200, { name: 'reports', paused: false });
    case 'GET /v1/tasks': {
      const tasks = u.searchParams.get('state') !== 'scheduled' ? [] : [
        { id: EVIL, state: 'scheduled', name: 'report.build', queue: 'reports', due_at: now + 90000 },
        { id: 'soon-1', state: 'scheduled', name: 'email.send', queue: 'default', due_at: now + 5000 },
      ];
      return send(200, { tasks, next_cursor: null });
    }
    case 'GET /v1/tasks/t1': return send(200, status('t1', api.t1));
    case 'GET /v1/tasks/t2': return send(200, status('t2', api.t2));
    case 'DELETE /v1/tasks/t2':
      api.t2 = 'cancelled';
      return send(200, { id: 't2', state: 'cancelled' });
    case 'GET /v1/schedules': return send(200, { schedules: [] });
    case 'GET /v1/dead': return send(200, { dead: api.dead, next_cursor: null });
    case 'POST /v1/dead/replay':
      api.dead = [];
      return send(200, { replayed: ['d1'], refused: [] });
    case 'GET /v1/events':
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write(': keep-alive\n\n');
      api.stream = res;
      return undefined;
    default:
      if (u.pathname.startsWith('/v1/tasks/')) return send(404, { error: 'unknown task' });
      res.writeHead(404);
      return res.end();
  }
}

function event(e) {
  api.stream.write(`event: ${e.event}\ndata: ${JSON.stringify(e)}\n\n`);
}

async function run(page, base) {
  const step = (what) => console.log(`[dashboard-spec] ${what}`);
  await page.goto(base);
  await page.fill('#token', TOKEN);
  await page.click('#login button[type=submit]');
  await page.locator('#live[data-state=on]').waitFor();

  await page.waitForFunction(() => {
    const row = document.querySelector('tr[data-queue="reports"]');
    return row && row.children[1].textContent === '5';
  });
  await page.locator('tr[data-queue="reports"] .state[data-state=paused]').waitFor();
  await page.locator('tr[data-queue="reports"]').getByRole('button', { name: 'Resume' }).click();
  await page.locator('tr[data-queue="reports"] .state[data-state=active]').waitFor();
  step('queues: depth shown, a paused queue resumed');

  await page.waitForFunction(() => document.getElementById('delay-summary').textContent === '2 waiting, 0 already due');
  await page.waitForFunction(() => document.querySelectorAll('#delay-body tr[data-task]').length === 2);
  const first = await page.getAttribute('#delay-body tr[data-task]', 'data-task');
  if (first !== 'soon-1') throw new Error(`falls due first: ${first}`);
  step('delay queue: counts, and what falls due first on top');

  await page.fill('#task-id', 't1');
  await page.click('#lookup button[type=submit]');
  await page.locator('#task-state[data-state=running]').waitFor();
  await page.locator('#task-fields dd[data-field=worker]').waitFor();
  api.t1 = 'succeeded';
  event({ event: 'succeeded', id: 't1', name: EVIL, queue: 'default', attempt: 1, at: Date.now(), error: null });
  await page.locator('#task-state[data-state=succeeded]').waitFor();
  await page.locator('#task-fields dd[data-field=result]').waitFor();
  await page.locator('#task-timeline li[data-event=succeeded]').first().waitFor();
  step('task: running, then succeeded with its result');

  await page.fill('#task-id', 't2');
  await page.click('#lookup button[type=submit]');
  await page.locator('#task-state[data-state=scheduled]').waitFor();
  await page.click('#task-cancel');
  await page.locator('#task-state[data-state=cancelled]').waitFor();
  step('task: a scheduled task cancelled');

  await page.fill('#task-id', 'nope');
  await page.click('#lookup button[type=submit]');
  await page.waitForFunction(() => document.getElementById('task-source').textContent.startsWith('No status'));
  step('task: an unknown id says so');

  await page.locator('#dead-body tr[data-dead="d1"] button.replay').click();
  await page.locator('#dead-body tr[data-dead="d1"]').waitFor({ state: 'detached' });
  step('dead letters: replayed');

  // The markup stayed text everywhere.
  const injected = await page.evaluate(() => ({
    xss: window.__xss === 1,
    imgs: document.querySelectorAll('main img').length,
    shown: document.body.textContent.includes('<img src=x'),
  }));
  if (injected.xss || injected.imgs || !injected.shown) {
    throw new Error(`data rendered as markup: ${JSON.stringify(injected)}`);
  }
  step('data shown as text, never as markup');

  for (const want of [
    'POST /v1/queues/reports/resume',
    'DELETE /v1/tasks/t2',
    'POST /v1/dead/replay {"ids":["d1"]}',
  ]) {
    if (!calls.some((c) => c.startsWith(want))) throw new Error(`no call ${want}: ${calls.join('\n')}`);
  }
  step('the API was called as documented');
}

async function main() {
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => answer(req, res, body));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${server.address().port}/`;
  const browser = await chromium.launch({
    executablePath: env('KAIROS_CHROMIUM'), headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const problems = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1360, height: 900 } });
    page.setDefaultTimeout(15000);
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(`console: ${m.text()}`);
    });
    await run(page, base);
    if (problems.length) throw new Error(`the page reported problems:\n${problems.join('\n')}`);
  } finally {
    await browser.close();
    if (api.stream) api.stream.end();
    server.close();
  }
}

main().then(
  () => console.log('[dashboard-spec] ok'),
  (e) => {
    console.error(`[dashboard-spec] FAILED: ${e.stack || e}`);
    process.exit(1);
  },
);
