// The Kairos dashboard: reads the scheduler's HTTP API (docs/HTTP.md) and
// renders it. Everything shown is put in with textContent (never innerHTML),
// so nothing a task carries can become markup.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = 'kairos.token';
  const QUEUES_EVERY_MS = 2000;
  const SLOW_EVERY_MS = 5000;
  const TASK_EVERY_MS = 1000;
  const MAX_EVENTS = 200;
  const MAX_RECONNECT_MS = 10000;
  const TERMINAL = ['succeeded', 'dead', 'cancelled'];
  // The task state an event says a task is in.
  const STATE_OF_EVENT = {
    scheduled: 'scheduled', published: 'ready', started: 'running',
    retried: 'retrying', succeeded: 'succeeded', dead: 'dead', cancelled: 'cancelled',
  };

  let token = sessionStorage.getItem(TOKEN_KEY) || '';
  let signedIn = null; // resolves once the API takes our token
  let signIn = null;
  const task = { id: null, status: null, events: [], fromEvents: null, note: '' };
  const events = [];
  // Set once GET /v1/tasks/{id} answered as a route this scheduler lacks:
  // the task's state then comes from the live events alone.
  let noTaskRoute = false;
  const NO_TASK_ROUTE = 'Task status is not available on this scheduler (GET /v1/tasks/{id} answered 404): ' +
    'the state shown comes from the live events seen since this page opened.';

  // ---- the API ----------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, missing) {
      super(message);
      this.status = status;
      // The route does not exist on this scheduler (an older version, or a
      // part not built yet): a 404 or 405 without the API's JSON error.
      this.missing = missing;
    }
  }

  function headers(extra) {
    const h = Object.assign({ Accept: 'application/json' }, extra || {});
    if (token) h.Authorization = 'Bearer ' + token;
    return h;
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(), cache: 'no-store' };
    if (method !== 'GET' && method !== 'DELETE') {
      // The API takes only JSON bodies, even empty ones (docs/HTTP.md).
      init.headers['Content-Type'] = 'application/json';
      init.body = body === undefined ? '' : JSON.stringify(body);
    }
    const res = await fetch(path, init);
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (res.status === 401) {
      askForToken(token ? 'The scheduler refused this token.' : '');
      throw new ApiError(401, 'the API token is needed', false);
    }
    if (!res.ok) {
      const err = data && typeof data.error === 'string' ? data.error : '';
      const missing = (res.status === 404 || res.status === 405) && !err;
      const what = missing
        ? `not available on this scheduler (${method} ${path.split('?')[0]} answered ${res.status})`
        : `${res.status}: ${err || res.statusText}`;
      const e = new ApiError(res.status, what, missing);
      e.data = data;
      throw e;
    }
    return data;
  }

  const path = (...parts) => parts.map((p, i) => (i % 2 ? encodeURIComponent(p) : p)).join('');

  // ---- the token --------------------------------------------------------

  function askForToken(message) {
    if (!signIn) signedIn = new Promise((resolve) => { signIn = resolve; });
    $('main').hidden = true;
    $('login').hidden = false;
    $('forget').hidden = true;
    $('login-error').textContent = message || '';
    $('token').focus();
  }

  async function tryToken(event) {
    event.preventDefault();
    token = $('token').value.trim();
    try {
      await api('GET', '/v1/schedules');
    } catch (e) {
      if (e.status !== 401) $('login-error').textContent = e.message;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token').value = '';
    opened();
  }

  function opened() {
    $('login').hidden = true;
    $('main').hidden = false;
    $('forget').hidden = !token;
    if (signIn) { const go = signIn; signIn = null; go(); }
    refreshAll();
  }

  function forget() {
    sessionStorage.removeItem(TOKEN_KEY);
    token = '';
    askForToken('');
  }

  // ---- rendering helpers -------------------------------------------------

  // An element with properties (`text` is its textContent, `data` its
  // dataset) and children (nodes, or strings put in as text).
  function el(tag, props, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'text') e.textContent = v == null ? '' : String(v);
      else if (k === 'data') Object.assign(e.dataset, v);
      else if (k === 'class') e.className = v;
      else e[k] = v;
    }
    for (const c of children) e.append(c instanceof Node ? c : String(c == null ? '' : c));
    return e;
  }

  const cell = (v, cls) => el('td', { text: v == null ? '–' : v, class: v == null ? '' : cls || '' });
  const num = (v) => cell(v == null ? '–' : Number(v).toLocaleString(), 'num');

  function fill(tbodyId, rows, empty, columns) {
    const body = $(tbodyId);
    if (!rows.length) {
      body.replaceChildren(el('tr', { class: 'empty' }, el('td', { colSpan: columns, text: empty })));
    } else {
      body.replaceChildren(...rows);
    }
  }

  function note(id, text) { $(id).textContent = text || ''; }

  function pad(n, w) { return String(n).padStart(w || 2, '0'); }

  // A time as the local clock shows it, with the date when not today.
  function clock(ms) {
    if (ms == null) return '–';
    const d = new Date(ms);
    const t = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
    if (d.toDateString() === new Date().toDateString()) return t;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${t}`;
  }

  // How far `ms` is from now: "in 4.2 s", "3 min ago".
  function relative(ms) {
    if (ms == null) return '–';
    const diff = ms - Date.now();
    const a = Math.abs(diff);
    let s;
    if (a < 60000) s = `${(a / 1000).toFixed(1)} s`;
    else if (a < 3600000) s = `${Math.round(a / 60000)} min`;
    else if (a < 172800000) s = `${(a / 3600000).toFixed(1)} h`;
    else s = `${Math.round(a / 86400000)} d`;
    return diff >= 0 ? `in ${s}` : `${s} ago`;
  }

  function timeCell(ms) {
    return el('td', { text: relative(ms), title: ms == null ? '' : new Date(ms).toISOString() });
  }

  function stateBadge(state) {
    return el('span', { class: 'state', text: state || 'unknown', data: { state: state || 'unknown' } });
  }

  // A button that runs `action`, disabled while it runs; a failure goes to
  // the note `noteId`.
  function button(label, noteId, action, props) {
    const b = el('button', Object.assign({ type: 'button', text: label }, props || {}));
    b.addEventListener('click', async () => {
      b.disabled = true;
      try {
        await action();
      } catch (e) {
        if (e.status !== 401) note(noteId, e.message);
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  // Runs `refresh`, putting a failure in the note `noteId` (and clearing
  // the table `tbodyId`); a missing route says "not available".
  async function guarded(noteId, tbodyId, columns, refresh) {
    try {
      await refresh();
    } catch (e) {
      if (e.status === 401) return;
      note(noteId, e.message);
      if (tbodyId) fill(tbodyId, [], e.missing ? 'not available' : 'could not load', columns);
    }
  }

  // ---- queues and the delay queue ------------------------------------------

  async function refreshQueues() {
    await guarded('queues-note', 'queues-body', 12, async () => {
      const data = await api('GET', '/v1/queues');
      note('queues-note', '');
      const rows = (data.queues || []).map((q) => {
        const r = q.rates || {};
        const paused = !!q.paused;
        return el('tr', { data: { queue: q.name } },
          cell(q.name), num(q.ready), num(q.consumers), num(q.delayed), num(q.due), num(q.dead),
          num(r.enqueued), num(r.succeeded), num(r.failed), num(r.dead),
          el('td', {}, stateBadge(paused ? 'paused' : 'active')),
          el('td', {}, button(paused ? 'Resume' : 'Pause', 'queues-note', async () => {
            await api('POST', path('/v1/queues/', q.name, paused ? '/resume' : '/pause'));
            await refreshQueues();
          })));
      });
      fill('queues-body', rows, 'no queues yet', 12);
      const dq = data.delay_queue || {};
      $('delay-summary').replaceChildren(
        el('strong', { text: dq.waiting == null ? '–' : dq.waiting }), ' waiting, ',
        el('strong', { text: dq.due == null ? '–' : dq.due }), ' already due');
    });
  }

  async function refreshDueSoon() {
    await guarded('delay-note', 'delay-body', 5, async () => {
      const lists = await Promise.all(['scheduled', 'retrying'].map((s) =>
        api('GET', `/v1/tasks?state=${s}&limit=200`)));
      note('delay-note', '');
      const waiting = lists.flatMap((l) => l.tasks || [])
        .filter((t) => t.due_at != null)
        .sort((a, b) => a.due_at - b.due_at)
        .slice(0, 10);
      fill('delay-body', waiting.map((t) => el('tr', { data: { task: t.id } },
        timeCell(t.due_at), el('td', {}, taskLink(t.id)), cell(t.name), cell(t.queue),
        el('td', {}, stateBadge(t.state)))), 'nothing waiting', 5);
    });
  }

  // ---- one task -----------------------------------------------------------

  function taskLink(id) {
    const a = el('a', { href: '#', text: id, class: 'id' });
    a.addEventListener('click', (e) => { e.preventDefault(); lookUp(id); });
    return a;
  }

  function lookUp(id) {
    $('task-id').value = id;
    Object.assign(task, { id, status: null, events: [], fromEvents: null, note: noTaskRoute ? NO_TASK_ROUTE : '' });
    $('task-view').hidden = false;
    note('task-note', '');
    renderTask();
    refreshTask();
  }

  async function refreshTask() {
    const id = task.id;
    if (!id || noTaskRoute) return;
    try {
      const status = await api('GET', path('/v1/tasks/', id));
      if (id !== task.id) return;
      task.status = status;
      task.note = '';
    } catch (e) {
      if (id !== task.id || e.status === 401) return;
      task.status = null;
      if (e.missing) {
        noTaskRoute = true;
        task.note = NO_TASK_ROUTE;
      } else if (e.status === 404) {
        task.note = 'No status for this id (unknown, or expired). Live events for it still show below.';
      } else {
        task.note = e.message;
      }
    }
    renderTask();
  }

  // How far along a state is, as the status store orders updates
  // (docs/HTTP.md): a later attempt is further, a finished task furthest.
  function rank(state, attempt) {
    if (TERMINAL.includes(state)) return Number.MAX_SAFE_INTEGER;
    const phase = { scheduled: 1, retrying: 1, ready: 2, running: 3 }[state] || 0;
    return (Number(attempt) || 1) * 16 + phase;
  }

  // The state the status store holds, unless a live event already told of
  // a later one (the store is written in batches, so it may lag a little).
  function currentState() {
    const s = task.status;
    const e = task.fromEvents;
    if (!s) return e ? e.state : null;
    if (e && rank(e.state, e.attempt) > rank(s.state, s.attempt)) return e.state;
    return s.state;
  }

  function renderTask() {
    if (!task.id) return;
    const s = task.status;
    const state = currentState();
    $('task-title').textContent = task.id;
    const badge = $('task-state');
    badge.textContent = state || 'unknown';
    badge.dataset.state = state || 'unknown';
    $('task-source').textContent = s ? 'from the status store' : task.note;
    $('task-cancel').hidden = !(state === 'scheduled' || state === 'retrying');
    $('task-abort').hidden = state !== 'running';
    const progress = $('task-progress');
    progress.hidden = !(s && s.progress != null);
    if (s && s.progress != null) progress.value = s.progress;

    const fields = [];
    if (s) {
      const shown = [
        ['name', s.name], ['queue', s.queue], ['priority', s.priority], ['attempt', s.attempt],
        ['enqueued', clock(s.enqueued_at)], ['due', clock(s.due_at)], ['started', clock(s.started_at)],
        ['finished', clock(s.finished_at)], ['worker', s.worker], ['schedule', s.schedule_id],
        ['progress', s.progress == null ? null : `${s.progress}% ${s.progress_message || ''}`],
        ['error', s.error], ['result', s.result == null ? null : JSON.stringify(s.result)],
      ];
      for (const [k, v] of shown) {
        if (v == null || v === '–') continue;
        fields.push(el('dt', { text: k }), el('dd', { text: v, data: { field: k } }));
      }
    }
    $('task-fields').replaceChildren(...fields);

    // The timeline: the live events seen for this task, and the times the
    // status store holds that no seen event already shows.
    const points = task.events.map((e) => ({ at: e.at, what: e.event, attempt: e.attempt, error: e.error }));
    const near = (kind, at) => points.some((p) => p.what === kind && Math.abs(p.at - at) < 1000);
    if (s) {
      const add = (at, what, kind) => {
        if (at != null && !near(kind, at)) points.push({ at, what, attempt: null, error: null, stored: true });
      };
      add(s.enqueued_at, 'enqueued', 'scheduled');
      add(s.started_at, 'started', 'started');
      if (TERMINAL.includes(s.state)) add(s.finished_at, s.state, s.state);
    }
    points.sort((a, b) => a.at - b.at);
    const items = points.map((p) => el('li', { data: { event: p.what }, class: p.stored ? 'stored' : '' },
      el('time', { text: clock(p.at) }), ' ', stateBadge(p.what),
      p.attempt ? ` attempt ${p.attempt}` : '', p.error ? el('span', { class: 'error', text: ` ${p.error}` }) : ''));
    if (!items.length) items.push(el('li', { class: 'muted', text: 'no events seen yet' }));
    $('task-timeline').replaceChildren(...items);
  }

  async function cancelTask(abort) {
    const id = task.id;
    try {
      const res = abort
        ? await api('POST', path('/v1/tasks/', id, '/abort'))
        : await api('DELETE', path('/v1/tasks/', id));
      note('task-note', `${abort ? 'abort' : 'cancel'}: ${res && res.state ? res.state : 'done'}`);
    } catch (e) {
      if (e.status !== 401) note('task-note', e.message);
    }
    refreshTask();
  }

  // ---- schedules ------------------------------------------------------------

  function trigger(s) {
    if (s.cron) return s.timezone ? `cron ${s.cron} (${s.timezone})` : `cron ${s.cron}`;
    if (s.every_ms != null) return `every ${s.every_ms / 1000} s`;
    if (s.at != null) return `once at ${clock(s.at)}`;
    return '–';
  }

  // The next ticks: the stored next one, and for a fixed interval the two
  // after it.
  function nextTicks(s) {
    if (s.next_fire_at == null) return s.enabled === false ? 'paused' : 'none';
    const ticks = [s.next_fire_at];
    if (s.every_ms) ticks.push(s.next_fire_at + s.every_ms, s.next_fire_at + 2 * s.every_ms);
    return ticks.map((t) => `${clock(t)} (${relative(t)})`).join(', ');
  }

  async function refreshSchedules() {
    await guarded('schedules-note', 'schedules-body', 7, async () => {
      const data = await api('GET', '/v1/schedules');
      note('schedules-note', '');
      const rows = (data.schedules || []).map((s) => {
        const enabled = s.enabled !== false;
        const t = s.task || {};
        const last = s.last_outcome;
        return el('tr', { data: { schedule: s.id } },
          cell(s.id), cell(trigger(s)), cell(`${t.name || '?'} → ${t.queue || 'default'}`),
          cell(nextTicks(s)),
          last ? el('td', {}, stateBadge(last.outcome), ` ${relative(last.at)}`) : cell(null),
          el('td', {}, stateBadge(enabled ? 'active' : 'paused')),
          el('td', {}, button(enabled ? 'Pause' : 'Resume', 'schedules-note', async () => {
            await api('POST', path('/v1/schedules/', s.id, enabled ? '/pause' : '/resume'));
            await refreshSchedules();
          })));
      });
      fill('schedules-body', rows, 'no schedules', 7);
    });
  }

  // ---- dead letters ---------------------------------------------------------

  let shownDead = [];

  function deadFilter() {
    return { queue: $('dead-queue').value.trim(), name: $('dead-name').value.trim(), error: $('dead-error').value.trim() };
  }

  async function refreshDead() {
    await guarded('dead-note', 'dead-body', 7, async () => {
      const f = deadFilter();
      const q = new URLSearchParams({ limit: '100' });
      for (const [k, v] of Object.entries(f)) if (v) q.set(k, v);
      const data = await api('GET', `/v1/dead?${q}`);
      // The filter again here, for a scheduler that does not filter.
      shownDead = (data.dead || []).filter((d) => (!f.queue || d.queue === f.queue) &&
        (!f.name || d.name === f.name) && (!f.error || String(d.error || '').toLowerCase().includes(f.error.toLowerCase())));
      const rows = shownDead.map((d) => el('tr', { data: { dead: d.id } },
        timeCell(d.failed_at), el('td', {}, taskLink(d.id)), cell(d.name), cell(d.queue), num(d.attempt),
        cell(d.error, 'error'),
        el('td', {}, button('Replay', 'dead-note', () => replay([d.id]), { className: 'replay' }))));
      fill('dead-body', rows, 'no dead letters', 7);
      if (data.next_cursor) note('dead-note', `showing the first ${shownDead.length}; narrow the filter to see others`);
    });
  }

  async function replay(ids) {
    if (!ids.length) return;
    const res = await api('POST', '/v1/dead/replay', { ids });
    const refused = (res.refused || []).map((r) => `${r.id}: ${r.error}`);
    note('dead-note', `replayed ${(res.replayed || []).length}` + (refused.length ? `; refused ${refused.join('; ')}` : ''));
    await refreshDead();
  }

  // ---- live events ------------------------------------------------------------

  function setLive(state, text) {
    const b = $('live');
    b.dataset.state = state;
    b.textContent = text;
  }

  function eventMatches(e, filter) {
    if (!filter) return true;
    return [e.id, e.name, e.queue, e.event].some((v) => String(v || '').includes(filter));
  }

  function eventRow(e) {
    return el('tr', { data: { event: e.event, task: e.id || '' } },
      el('td', { text: clock(e.at) }), el('td', {}, stateBadge(e.event)),
      el('td', {}, e.id ? taskLink(e.id) : '–'), cell(e.name), cell(e.queue), num(e.attempt),
      cell(e.error, 'error'));
  }

  function renderEvents() {
    const f = $('events-filter').value.trim();
    fill('events-body', events.filter((e) => eventMatches(e, f)).map(eventRow), 'no events yet', 7);
  }

  function onEvent(e) {
    events.unshift(e);
    if (events.length > MAX_EVENTS) events.length = MAX_EVENTS;
    const body = $('events-body');
    if (eventMatches(e, $('events-filter').value.trim())) {
      if (body.querySelector('tr.empty')) body.replaceChildren();
      body.prepend(eventRow(e));
      while (body.children.length > MAX_EVENTS) body.lastChild.remove();
    }
    if (e.id && e.id === task.id) {
      task.events.push(e);
      const next = STATE_OF_EVENT[e.event];
      const seen = task.fromEvents;
      if (next && (!seen || rank(next, e.attempt) > rank(seen.state, seen.attempt))) {
        task.fromEvents = { state: next, attempt: e.attempt };
      }
      renderTask();
      refreshTask();
    }
    if (e.event === 'dead') refreshDead();
  }

  // One SSE block: `event:` and `data:` lines; comments (keep-alives) and
  // anything that is not JSON are skipped.
  function onBlock(block) {
    const data = block.split('\n').filter((l) => l.startsWith('data:'))
      .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
    if (!data) return;
    try { onEvent(JSON.parse(data)); } catch (_) { /* not an event */ }
  }

  // Follows GET /v1/events with fetch (EventSource cannot send the token),
  // reconnecting with a growing pause when the stream ends.
  async function follow() {
    let pause = 500;
    for (;;) {
      if (signedIn && signIn) await signedIn;
      try {
        const res = await fetch('/v1/events', { headers: headers({ Accept: 'text/event-stream' }), cache: 'no-store' });
        if (res.status === 401) {
          askForToken(token ? 'The scheduler refused this token.' : '');
          continue;
        }
        if (!res.ok || !res.body) {
          setLive('error', res.status === 404 ? 'events: not available' : `events: ${res.status}`);
        } else {
          setLive('on', 'events: live');
          pause = 500;
          const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
          let buf = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += value.replace(/\r\n?/g, '\n');
            let i;
            while ((i = buf.indexOf('\n\n')) >= 0) {
              onBlock(buf.slice(0, i));
              buf = buf.slice(i + 2);
            }
          }
          setLive('off', 'events: reconnecting');
        }
      } catch (_) {
        setLive('off', 'events: reconnecting');
      }
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, MAX_RECONNECT_MS);
    }
  }

  // ---- start ----------------------------------------------------------------

  function refreshAll() {
    refreshQueues();
    refreshDueSoon();
    refreshSchedules();
    refreshDead();
    refreshTask();
  }

  function every(ms, f) {
    setInterval(() => { if (!$('main').hidden && !document.hidden) f(); }, ms);
  }

  async function start() {
    $('login').addEventListener('submit', tryToken);
    $('forget').addEventListener('click', forget);
    $('lookup').addEventListener('submit', (e) => { e.preventDefault(); lookUp($('task-id').value.trim()); });
    $('task-cancel').addEventListener('click', () => cancelTask(false));
    $('task-abort').addEventListener('click', () => cancelTask(true));
    $('dead-filter').addEventListener('submit', (e) => { e.preventDefault(); refreshDead(); });
    $('dead-replay-all').addEventListener('click', () => replay(shownDead.map((d) => d.id))
      .catch((e) => { if (e.status !== 401) note('dead-note', e.message); }));
    $('events-filter').addEventListener('input', renderEvents);
    $('events-clear').addEventListener('click', () => { events.length = 0; renderEvents(); });
    renderEvents();

    every(QUEUES_EVERY_MS, refreshQueues);
    every(SLOW_EVERY_MS, () => { refreshDueSoon(); refreshSchedules(); refreshDead(); });
    // Until the status store has the task finished (live events may tell
    // of it first: the store is written in batches).
    every(TASK_EVERY_MS, () => {
      if (task.id && !(task.status && TERMINAL.includes(task.status.state))) refreshTask();
    });
    setInterval(() => { $('clock').textContent = clock(Date.now()); }, 1000);

    try {
      await api('GET', '/v1/schedules');
      opened();
    } catch (e) {
      if (e.status !== 401) {
        opened();
      }
    }
    follow();
  }

  start();
})();
