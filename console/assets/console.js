// The operator console of the Pagoda hook bus: plain JavaScript, no framework.
// Every text from the server goes into the page as text (textContent), never
// as HTML. The token is kept in sessionStorage (this tab only) and sent as
// `Authorization: Token <key>` on every request.
'use strict';

const TOKEN_KEY = 'hookbus-console-token';
const TAIL_MAX_ROWS = 500;
const HOOKS = [
  'entry.before_create', 'entry.after_create', 'entry.before_update', 'entry.after_update',
  'entry.before_delete', 'entry.after_delete', 'entry.before_restore', 'entry.after_restore',
  'entry.validate', 'entry.get_attrs', 'entity.before_create', 'entity.after_create',
  'entity.before_update', 'entity.after_update', 'entity.before_delete', 'entity.after_delete',
  'entity.get_attrs',
];

const $ = (id) => document.getElementById(id);

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'onclick') node.addEventListener('click', v);
    else if (k.startsWith('data-')) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

/** Calls the API; throws ApiError. A 401/403 signs out. */
async function api(path, options = {}) {
  const headers = { Authorization: `Token ${token()}`, Accept: 'application/json' };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method: options.method || 'GET',
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
    signal: options.signal,
  });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const error = new ApiError(response.status, body);
    if (response.status === 401 || response.status === 403) signOut(error.message);
    throw error;
  }
  return body;
}

function ago(time) {
  if (!time) return '-';
  const secs = Math.max(0, Math.round((Date.now() - Date.parse(time)) / 1000));
  if (Number.isNaN(secs)) return time;
  if (secs < 60) return `${secs}s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)}m ago`;
  if (secs < 86400) return `${Math.floor(secs / 3600)}h ago`;
  return `${Math.floor(secs / 86400)}d ago`;
}

function short(text, n) {
  if (text === undefined || text === null) return '';
  const s = String(text);
  return s.length > n ? `${s.slice(0, n - 1)}…` : s;
}

function percent(rate) {
  return rate === null || rate === undefined ? '-' : `${(rate * 100).toFixed(1)} %`;
}

function statusBadge(status) {
  const s = String(status || 'unknown');
  const kind = /^(ok|succeeded|done)$/i.test(s) ? 'good'
    : /not enabled|waiting|in_progress|deferred|unknown/i.test(s) ? 'neutral' : 'bad';
  return el('span', { class: `badge ${kind}`, 'data-status': s }, s.replace(/_/g, ' '));
}

/** Asks for a confirmation in the page's dialog; resolves to true or false. */
function confirmDialog(title, text, okLabel) {
  const dialog = $('confirm');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  $('confirm-ok').textContent = okLabel || 'Confirm';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    dialog.returnValue = 'cancel';
    dialog.showModal();
  });
}

// --- sign in and out -------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopTail();
  $('app').hidden = true;
  $('who').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
}

async function signIn(key) {
  sessionStorage.setItem(TOKEN_KEY, key);
  try {
    const me = await api('/api/console/me');
    $('username').textContent = me.username;
    $('who').hidden = false;
    $('login').hidden = true;
    $('app').hidden = false;
    showTab('plugins');
  } catch (e) {
    if (!(e instanceof ApiError && (e.status === 401 || e.status === 403))) signOut(e.message);
  }
}

// --- tabs ------------------------------------------------------------------

function showTab(name) {
  for (const button of document.querySelectorAll('[role=tab]')) {
    button.setAttribute('aria-selected', String(button.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll('.tab')) {
    panel.hidden = panel.id !== `tab-${name}`;
  }
  if (name === 'plugins') loadPlugins();
  if (name === 'tail' && !tail.controller) startTail();
  if (name === 'dlq') loadDeadLetters();
}

// --- plugins ---------------------------------------------------------------

async function loadPlugins() {
  const summary = $('plugins-summary');
  summary.textContent = 'loading…';
  let data;
  try {
    data = await api('/api/console/plugins');
  } catch (e) {
    summary.textContent = `error: ${e.message}`;
    return;
  }
  const bus = data.bus;
  summary.textContent = bus
    ? `bus ${bus.status}, dispatcher ${bus.dispatcher_role || '?'}, ${bus.pending} pending, ${bus.ack_pending} in hand, ${bus.events_acked} acked since start`
    : 'the bus does not answer';
  summary.className = `summary ${data.healthy ? 'good' : 'bad'}`;
  const problems = $('plugins-problems');
  problems.replaceChildren(
    ...data.problems.map((p) => el('li', { class: 'bad' }, p)),
    ...data.warnings.map((w) => el('li', { class: 'warn' }, w)),
  );
  const tbody = document.querySelector('#plugins-table tbody');
  tbody.replaceChildren();
  for (const p of data.plugins) {
    const attempts = p.handlers.reduce((n, h) => n + (h.successes || 0) + (h.errors || 0), 0);
    const errors = p.handlers.reduce((n, h) => n + (h.errors || 0), 0);
    tbody.append(el('tr', { 'data-plugin': p.id },
      el('td', {}, el('strong', {}, p.id), p.version ? el('span', { class: 'muted' }, ` ${p.version}`) : null),
      el('td', {}, statusBadge(p.status)),
      el('td', {}, p.enabled ? `#${p.enabled}` : 'no'),
      el('td', { class: 'num' }, p.replicas === null ? '?' : p.replicas),
      el('td', { class: 'num' }, p.lag === null ? '-' : p.lag),
      el('td', { class: 'num' }, p.deferred),
      el('td', { class: 'num' }, p.dead_letters
        ? el('a', { href: '#', onclick: (ev) => { ev.preventDefault(); $('dlq-plugin').value = p.id; showTab('dlq'); } }, p.dead_letters)
        : '0'),
      el('td', { class: 'num' }, attempts ? percent(errors / attempts) : '-'),
      el('td', {}, ago(p.last_success)),
      el('td', { title: p.last_error || '' }, p.last_error ? `${short(p.last_error, 60)} (${ago(p.last_error_at)})` : '-'),
    ));
  }
  if (!data.plugins.length) tbody.append(el('tr', {}, el('td', { colSpan: 10, class: 'muted' }, 'no plugin registered or enabled')));

  const stats = new Map();
  for (const p of data.plugins) for (const h of p.handlers) stats.set(`${p.id}/${h.name}`, h);
  const order = $('plugins-order');
  order.replaceChildren();
  for (const group of data.order) {
    const rows = group.handlers.map((r, i) => {
      const s = stats.get(`${r.plugin}/${r.handler}`) || {};
      return el('tr', { 'data-handler': `${r.plugin}/${r.handler}` },
        el('td', { class: 'num' }, i + 1),
        el('td', {}, `${r.plugin}/${r.handler}`),
        el('td', { class: 'num' }, r.priority),
        el('td', {}, r.entities ? r.entities.join(', ') : '*'),
        el('td', { class: 'num' }, s.deliveries ?? '-'),
        el('td', { class: 'num' }, s.successes ?? '-'),
        el('td', { class: 'num' }, s.errors ?? '-'),
        el('td', { class: 'num' }, percent(s.error_rate)),
        el('td', { class: 'num' }, s.dead_letters ?? '-'),
        el('td', { class: 'num' }, s.deferred ?? '-'),
      );
    });
    order.append(el('div', { class: 'hook' },
      el('h4', {}, group.hook),
      el('table', {},
        el('thead', {}, el('tr', {}, ['#', 'Handler', 'Priority', 'Entities', 'Deliveries', 'Successes', 'Errors', 'Error rate', 'Dead letters', 'Deferred'].map((t) => el('th', {}, t)))),
        el('tbody', {}, rows)),
    ));
  }
  if (!data.order.length) order.append(el('p', { class: 'muted' }, 'no handler of an enabled plugin'));
}

// --- live tail -------------------------------------------------------------

const tail = { controller: null };

function stopTail() {
  if (tail.controller) tail.controller.abort();
  tail.controller = null;
  $('tail-status').textContent = 'stopped';
}

function tailRow(e) {
  const row = el('tr', { 'data-seq': e.seq, 'data-hook': e.hook || '', 'data-entity': e.entity || '', class: 'clickable',
    onclick: () => { $('journey-key').value = e.seq; showTab('journey'); showJourney(); } },
  el('td', { class: 'num' }, e.seq),
  el('td', { title: `stored ${e.stored || '?'}` }, e.time ? new Date(e.time).toLocaleTimeString() : '-'),
  el('td', {}, e.hook || '?'),
  el('td', {}, e.entity ?? '?'),
  el('td', {}, e.object || '?'),
  el('td', {}, e.name || ''),
  el('td', {}, e.actor || ''),
  el('td', { class: 'mono' }, e.trace_id ? short(e.trace_id, 14) : ''));
  return row;
}

/** Follows GET /api/console/events (server-sent events) with fetch, so the token goes in a header. */
async function startTail() {
  stopTail();
  const params = new URLSearchParams();
  const hook = $('tail-hook').value.trim();
  const entity = $('tail-entity').value;
  if (hook) params.set('hook', hook);
  if (entity) params.set('entity', entity);
  params.set('back', $('tail-back').value || '0');
  const controller = new AbortController();
  tail.controller = controller;
  const tbody = document.querySelector('#tail-table tbody');
  tbody.replaceChildren();
  const status = $('tail-status');
  status.textContent = 'connecting…';
  let response;
  try {
    response = await fetch(`/api/console/events?${params}`, {
      headers: { Authorization: `Token ${token()}`, Accept: 'text/event-stream' },
      signal: controller.signal,
    });
  } catch (e) {
    if (tail.controller === controller) status.textContent = `error: ${e.message}`;
    return;
  }
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    const error = new ApiError(response.status, body);
    if (response.status === 401 || response.status === 403) signOut(error.message);
    status.textContent = `error: ${error.message}`;
    tail.controller = null;
    return;
  }
  status.textContent = 'following';
  let shown = 0;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done || tail.controller !== controller) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = 'message';
        const data = [];
        for (const line of block.split('\n')) {
          if (line.startsWith('event:')) type = line.slice(6).trim();
          else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
        }
        if (!data.length) continue;
        const payload = JSON.parse(data.join('\n'));
        if (type === 'event') {
          tbody.prepend(tailRow(payload));
          while (tbody.rows.length > TAIL_MAX_ROWS) tbody.deleteRow(-1);
          shown += 1;
          status.textContent = `following: ${shown} event(s)`;
        } else if (type === 'failure') {
          status.textContent = `error: ${payload.message}`;
        }
      }
    }
    if (tail.controller === controller) status.textContent = 'the server ended the tail';
  } catch (e) {
    if (e.name !== 'AbortError' && tail.controller === controller) status.textContent = `error: ${e.message}`;
  }
  if (tail.controller === controller) tail.controller = null;
}

// --- event journey ---------------------------------------------------------

function field(label, value, cls) {
  return [el('dt', {}, label), el('dd', { class: cls || '' }, value === undefined || value === null || value === '' ? '-' : value)];
}

const DISPATCH_TEXT = {
  done: 'The bus has finished this event: every handler below succeeded, was dead-lettered or deferred.',
  in_progress: 'The bus has taken this event and has not finished it yet (or has, after an earlier event still in hand).',
  waiting: 'The bus has not taken this event yet.',
  unknown: 'The dispatcher\'s position cannot be read.',
};

async function showJourney() {
  const key = $('journey-key').value.trim();
  const out = $('journey');
  if (!key) { out.replaceChildren(el('p', { class: 'muted' }, 'Enter a stream sequence (from the live tail) or an event id.')); return; }
  out.replaceChildren(el('p', { class: 'muted' }, 'loading…'));
  const query = /^\d+$/.test(key) ? `seq=${key}` : `id=${encodeURIComponent(key)}`;
  let j;
  try {
    j = await api(`/api/console/journey?${query}`);
  } catch (e) {
    out.replaceChildren(el('p', { class: 'error' }, e.message));
    return;
  }
  const e = j.event;
  const card = el('div', { class: 'card', id: 'journey-event' },
    el('h3', {}, `${e.hook || '?'} ${e.object || ''} `, el('span', { class: 'muted' }, `#${e.seq}`)),
    el('dl', {},
      field('Event id', j.event_id, 'mono'),
      field('Entity', e.entity),
      field('Name', e.name),
      field('Time', e.time),
      field('Stored', e.stored),
      field('Actor', e.actor),
      field('Subject', e.subject, 'mono'),
      field('Trace id', e.trace_id, 'mono trace-id'),
      field('traceparent', e.traceparent, 'mono')));
  const d = j.dispatch;
  const dispatch = el('div', { class: 'card' },
    el('h3', {}, 'Dispatch ', statusBadge(d.state)),
    el('p', {}, DISPATCH_TEXT[d.state] || ''),
    el('p', { class: 'muted' }, d.ack_floor !== undefined
      ? `consumer ${d.consumer}: acknowledged up to #${d.ack_floor}, delivered up to #${d.delivered}`
      : (d.message || '')));
  const rows = j.handlers.map((h) => {
    const dl = h.dead_letter;
    const attempts = dl && Array.isArray(dl.attempts)
      ? el('ol', { class: 'attempts' }, dl.attempts.map((a) => el('li', {}, `attempt ${a.attempt} at ${a.at}: `, el('span', { class: 'error' }, a.error))))
      : null;
    const s = h.stats || {};
    return el('tr', { 'data-handler': `${h.plugin}/${h.handler}`, 'data-status': h.status },
      el('td', { class: 'num' }, h.position),
      el('td', {}, `${h.plugin}/${h.handler}`),
      el('td', { class: 'num' }, h.priority),
      el('td', {}, statusBadge(h.status)),
      el('td', {}, dl ? [el('div', {}, `dead letter #${dl.seq} at ${dl.dead_lettered_at}`), attempts] : ''),
      el('td', { class: 'muted' }, s.deliveries !== undefined
        ? `${s.deliveries} deliveries, ${s.errors} failed attempts, last success ${ago(s.last_success)}` : 'no counters'));
  });
  const handlers = el('div', { class: 'card' },
    el('h3', {}, 'Deliveries'),
    el('p', { class: 'muted' }, 'The handlers that match this event in the registry now, in dispatch order. A succeeded delivery leaves no record but the counters; a failed one leaves a dead letter with every attempt.'),
    el('table', { id: 'journey-handlers' },
      el('thead', {}, el('tr', {}, ['#', 'Handler', 'Priority', 'Delivery', 'Attempts and errors', 'Handler counters'].map((t) => el('th', {}, t)))),
      el('tbody', {}, rows.length ? rows : el('tr', {}, el('td', { colSpan: 6, class: 'muted' }, j.registry_answered ? 'no handler matches this event now' : 'the bus does not answer: handlers unknown')))));
  const others = j.dead_letters.filter((l) => !j.handlers.some((h) => h.dead_letter && h.dead_letter.seq === l.seq));
  const extra = others.length ? el('div', { class: 'card' }, el('h3', {}, 'Other dead letters of this event'),
    el('ul', {}, others.map((l) => el('li', {}, `#${l.seq} ${l.record.plugin}/${l.record.handler}: ${l.record.error}`)))) : null;
  const headers = el('div', { class: 'card' }, el('h3', {}, 'Headers'),
    el('table', { class: 'kv' }, el('tbody', {}, j.headers.map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', { class: 'mono' }, v))))));
  const payload = el('div', { class: 'card' }, el('h3', {}, 'Event (CloudEvents envelope)'),
    el('pre', {}, JSON.stringify(j.envelope, null, 2)));
  out.replaceChildren(card, dispatch, handlers, extra || '', headers, payload);
}

// --- dead letters ----------------------------------------------------------

function dlqParams() {
  const params = new URLSearchParams();
  for (const [id, name] of [['dlq-plugin', 'plugin'], ['dlq-handler', 'handler'], ['dlq-hook', 'hook'], ['dlq-entity', 'entity'], ['dlq-error', 'error'], ['dlq-since', 'since']]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  return params;
}

async function loadDeadLetters() {
  const summary = $('dlq-summary');
  summary.textContent = 'loading…';
  let data;
  try {
    data = await api(`/api/console/dlq?${dlqParams()}`);
  } catch (e) {
    summary.textContent = `error: ${e.message}`;
    return;
  }
  summary.textContent = data.total === data.shown
    ? `${data.total} dead letter(s)` : `${data.total} dead letter(s), the newest ${data.shown} shown`;
  const tbody = document.querySelector('#dlq-table tbody');
  tbody.replaceChildren();
  for (const l of data.letters) {
    const r = l.record || {};
    const journey = (ev) => { ev.preventDefault(); $('journey-key').value = r.stream_seq || r.event_id; showTab('journey'); showJourney(); };
    tbody.append(el('tr', { 'data-seq': l.seq },
      el('td', { class: 'num' }, l.seq),
      el('td', {}, r.dead_lettered_at ? ago(r.dead_lettered_at) : '-'),
      el('td', {}, l.replayable ? `${r.plugin}/${r.handler}` : l.subject),
      el('td', {}, r.hook || ''),
      el('td', {}, r.entity || ''),
      el('td', {}, l.replayable ? el('a', { href: '#', class: 'journey-link', onclick: journey }, r.object) : ''),
      el('td', { class: 'num' }, Array.isArray(r.attempts) ? r.attempts.length : ''),
      el('td', { class: 'error', title: r.error || '' }, l.replayable ? short(r.error, 80) : 'not a handler\'s dead letter (an unreadable event)'),
      el('td', {}, l.replayable ? el('button', { type: 'button', class: 'replay', onclick: () => replay(l) }, 'Replay…') : '')));
  }
  if (!data.letters.length) tbody.append(el('tr', {}, el('td', { colSpan: 9, class: 'muted' }, 'no dead letter')));
}

async function replay(letter) {
  const r = letter.record;
  const ok = await confirmDialog(`Replay dead letter #${letter.seq}?`,
    `The event ${r.event_id} (${r.hook} ${r.object}) goes back to ${r.plugin}/${r.handler}, once. On success the dead letter is removed; on failure it is kept with the attempt added.`,
    'Replay');
  if (!ok) return;
  const result = $('dlq-result');
  result.textContent = `replaying #${letter.seq}…`;
  try {
    const answer = await api(`/api/console/dlq/${letter.seq}/replay`, { method: 'POST', body: {} });
    result.textContent = answer.result === 'succeeded'
      ? `#${letter.seq} replayed: ${r.plugin}/${r.handler} succeeded; the dead letter was removed`
      : `#${letter.seq} failed again (${answer.error}); kept as #${answer.new_seq}`;
    result.className = `result ${answer.result === 'succeeded' ? 'good' : 'bad'}`;
  } catch (e) {
    result.textContent = `replay failed: ${e.message}`;
    result.className = 'result bad';
  }
  loadDeadLetters();
}

// The dead-letter form as the filter of `hookbus dlq` (an empty form: all).
function dlqFilter() {
  const filter = {};
  for (const [k, v] of dlqParams()) filter[k] = v;
  return filter;
}

// Replays or purges what the form selects: a dry run first, whose count and
// selection the confirmation shows; then the run.
async function bulk(action) {
  const filter = dlqFilter();
  const body = { filter, all: Object.keys(filter).length === 0 };
  const url = `/api/console/dlq/${action}`;
  const result = $('dlq-result');
  let dry;
  try {
    dry = await api(url, { method: 'POST', body });
  } catch (e) {
    result.textContent = `${action}: ${e.message}`;
    result.className = 'result bad';
    return;
  }
  const ok = action === 'purge'
    ? await confirmDialog(`Delete ${dry.matched} dead letter(s)?`,
      `Every dead letter of ${dry.selection} (up to #${dry.last_seq}) is deleted for good. This cannot be undone.`,
      'Delete')
    : await confirmDialog(`Replay ${dry.matched} dead letter(s)?`,
      `Each dead letter of ${dry.selection} (up to #${dry.last_seq}) goes back to its handler once, 10 per second. On success it is removed; on failure it is kept with the attempt added.`,
      'Replay');
  if (!ok) return;
  result.textContent = `${action === 'purge' ? 'purging' : 'replaying'} ${dry.matched} dead letter(s)…`;
  result.className = 'result';
  try {
    const done = await api(url, { method: 'POST', body: { ...body, confirm: true } });
    if (action === 'purge') {
      result.textContent = `purged ${done.purged} dead letter(s) of ${done.selection}`;
      result.className = 'result good';
    } else {
      result.textContent = `replayed ${done.matched} dead letter(s) of ${done.selection}: ${done.succeeded} succeeded, ${done.failed} failed again, ${done.skipped} skipped`;
      result.className = `result ${done.failed || done.skipped ? 'bad' : 'good'}`;
    }
  } catch (e) {
    result.textContent = `${action} failed: ${e.message}`;
    result.className = 'result bad';
  }
  loadDeadLetters();
}

// --- start -----------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('hooks').replaceChildren(...HOOKS.map((h) => el('option', { value: h })));
  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('token').value.trim();
    $('token').value = '';
    signIn(key);
  });
  $('signout').addEventListener('click', () => signOut(''));
  for (const button of document.querySelectorAll('[role=tab]')) {
    button.addEventListener('click', () => showTab(button.dataset.tab));
  }
  $('plugins-refresh').addEventListener('click', loadPlugins);
  $('tail-form').addEventListener('submit', (ev) => { ev.preventDefault(); startTail(); });
  $('tail-stop').addEventListener('click', stopTail);
  $('journey-form').addEventListener('submit', (ev) => { ev.preventDefault(); showJourney(); });
  $('dlq-form').addEventListener('submit', (ev) => { ev.preventDefault(); loadDeadLetters(); });
  $('dlq-replay').addEventListener('click', () => bulk('replay'));
  $('dlq-purge').addEventListener('click', () => bulk('purge'));
  if (token()) signIn(token()); else signOut('');
});
