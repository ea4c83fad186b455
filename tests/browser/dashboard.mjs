// Drives the dashboard in headless Chromium (Debian's `chromium`, through
// playwright-core from target/node): run by tests/tests/dashboard.rs, which
// starts the scheduler and worker and prepares what the page must show.
//
// Environment (set by the Rust test):
//   KAIROS_UI_URL          the page, http://127.0.0.1:PORT/
//   KAIROS_UI_TOKEN        the scheduler's API token
//   KAIROS_UI_TASK_ID      a task id this script enqueues and follows
//   KAIROS_UI_DEAD_ID      a dead letter to replay
//   KAIROS_UI_SCHEDULE_ID  a schedule to pause and resume
//   KAIROS_UI_QUEUE        a queue the test filled, KAIROS_UI_QUEUE_READY its depth
//   KAIROS_UI_LATER_ID     a task waiting in the delay queue
//   KAIROS_CHROMIUM        the browser binary
//   KAIROS_NODE_MODULES    where playwright-core is installed
//   KAIROS_UI_SCREENSHOTS  a directory: when set, screenshots go there
// Prints one line per step; exits non-zero with the reason on a failure.

import { createRequire } from 'node:module';
import path from 'node:path';

const STEP_MS = 30000;

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (tests/tests/dashboard.rs sets it)`);
  return v;
}

const require = createRequire(path.join(env('KAIROS_NODE_MODULES'), 'x.js'));
const { chromium } = require('playwright-core');

const url = env('KAIROS_UI_URL');
const token = env('KAIROS_UI_TOKEN');
const taskId = env('KAIROS_UI_TASK_ID');
const deadId = env('KAIROS_UI_DEAD_ID');
const scheduleId = env('KAIROS_UI_SCHEDULE_ID');
const queue = env('KAIROS_UI_QUEUE');
const queueReady = Number(env('KAIROS_UI_QUEUE_READY'));
const laterId = env('KAIROS_UI_LATER_ID');
const shots = process.env.KAIROS_UI_SCREENSHOTS || '';

const step = (what) => console.log(`[dashboard] ${what}`);
const css = (s) => JSON.stringify(String(s));

async function main() {
  const browser = await chromium.launch({
    executablePath: env('KAIROS_CHROMIUM'),
    headless: true,
    // Root (as in CI) cannot use Chromium's sandbox.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const problems = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1360, height: 900 }, colorScheme: 'light' });
    page.setDefaultTimeout(STEP_MS);
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      // A refused request (401 before the token, 404 of a missing route)
      // is logged by Chromium itself; a CSP violation or a script error is
      // a bug of the page.
      const t = m.text();
      if (m.type() === 'error' && !t.startsWith('Failed to load resource')) problems.push(`console: ${t}`);
    });
    await run(page);
    if (problems.length) throw new Error(`the page reported problems:\n${problems.join('\n')}`);
  } finally {
    await browser.close();
  }
}

async function shot(page, name, locator) {
  if (!shots) return;
  const file = path.join(shots, name);
  if (locator) await locator.screenshot({ path: file });
  else await page.screenshot({ path: file, fullPage: true });
  step(`screenshot ${file}`);
}

async function run(page) {
  const res = await page.goto(url);
  const csp = res.headers()['content-security-policy'] || '';
  if (!csp.includes("script-src 'self'") || !csp.includes("frame-ancestors 'none'")) {
    throw new Error(`the page came without its CSP: ${csp}`);
  }

  // The token: asked once, a wrong one refused.
  await page.locator('#login').waitFor({ state: 'visible' });
  step('asks for the token');
  await page.fill('#token', 'not-the-token');
  await page.click('#login button[type=submit]');
  await page.waitForFunction(() => document.getElementById('login-error').textContent.includes('refused'));
  await shot(page, 'dashboard-login.png', page.locator('#login'));
  await page.fill('#token', token);
  await page.click('#login button[type=submit]');
  await page.locator('#main').waitFor({ state: 'visible' });
  const stored = await page.evaluate(() => sessionStorage.getItem('kairos.token'));
  if (stored !== token) throw new Error('the token is not kept in sessionStorage');
  step('signed in');
  await page.locator('#live[data-state=on]').waitFor();
  step('event stream live');

  // Schedules: pause and resume.
  const sched = page.locator(`tr[data-schedule=${css(scheduleId)}]`);
  await sched.waitFor();
  await sched.getByRole('button', { name: 'Pause' }).click();
  await sched.locator('.state[data-state=paused]').waitFor();
  await sched.getByRole('button', { name: 'Resume' }).click();
  await sched.locator('.state[data-state=active]').waitFor();
  step(`schedule ${scheduleId} paused and resumed`);

  // Queues.
  await page.waitForFunction(([q, n]) => {
    const row = document.querySelector(`tr[data-queue="${q}"]`);
    return row && Number(row.children[1].textContent.replace(/\D/g, '')) >= n;
  }, [queue, queueReady]);
  step(`queue ${queue} shows ${queueReady} ready`);
  await page.waitForFunction(() => /^[1-9]/.test(document.getElementById('delay-summary').textContent));
  step('the delay queue shows a waiting task');

  // What falls due soon (GET /v1/tasks?state=scheduled, with the task route).
  await page.locator(`#delay-body tr[data-task=${css(laterId)}]`).waitFor();
  step(`${laterId} listed as falling due`);

  // A task looked up by id, watched until it succeeded.
  await page.fill('#task-id', taskId);
  await page.click('#lookup button[type=submit]');
  await page.locator('#task-view').waitFor({ state: 'visible' });
  const enqueued = await page.evaluate(async ([id, t]) => {
    const r = await fetch('/v1/tasks', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${t}` },
      body: JSON.stringify({ name: 'kairos.sleep', id, body: { ms: 1500 } }),
    });
    return r.status;
  }, [taskId, token]);
  if (enqueued !== 202) throw new Error(`POST /v1/tasks answered ${enqueued}`);
  step(`task ${taskId} enqueued`);
  await page.locator('#task-state[data-state=running]').waitFor();
  step('task running');
  await page.locator('#task-state[data-state=succeeded]').waitFor();
  await page.locator('#task-timeline li[data-event=started]').waitFor();
  await page.locator('#task-timeline li[data-event=succeeded]').waitFor();
  step('task succeeded, timeline shows started and succeeded');
  await page.waitForFunction(() => document.getElementById('task-source').textContent.includes('status store'));
  await page.locator('#task-fields dd[data-field=worker]').waitFor();
  step('task status from GET /v1/tasks/{id}');
  await page.locator(`#events-body tr[data-task=${css(taskId)}][data-event=succeeded]`).waitFor();
  step('live events show the task');

  // A dead letter replayed.
  const dead = page.locator(`#dead-body tr[data-dead=${css(deadId)}]`);
  await dead.waitFor();
  await shot(page, 'dashboard.png');
  await shot(page, 'dashboard-task.png', page.locator('#task'));
  await dead.locator('button.replay').click();
  await dead.waitFor({ state: 'detached' });
  await page.waitForFunction(() => document.getElementById('dead-note').textContent.includes('replayed 1'));
  step(`dead letter ${deadId} replayed and gone from the list`);
}

main().then(
  () => step('ok'),
  (e) => {
    console.error(`[dashboard] FAILED: ${e.stack || e}`);
    process.exit(1);
  },
);
