// Drives the operator console in headless Chromium (playwright-core, Debian's
// /usr/bin/chromium; no browser download). Run by tests/tests/console.rs, which
// sets up the bus, the plugins, three dead letters of shop-sync/push, and the
// console; prints one line per step on stdout, `done` at the end, and exits 1
// at the first failed check.
//
// Environment:
//   CONSOLE_URL     http://127.0.0.1:<port> of `hookbus console`
//   CONSOLE_TOKEN   a superuser's API token
//   CHROMIUM_BIN    the browser (default /usr/bin/chromium)
//   REPLAY_SEQ      the dead letter to replay (of the event EVENT_SEQ)
//   EVENT_SEQ       its event's stream sequence
//   TRACE_ID        the trace id of the events' traceparent
//   SCREENSHOT_DIR  when set, a PNG of each page is written there
//
// Between "tail-following" and the next step the test publishes one more event
// (customer, entry 4), which the live tail must show.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const base = env('CONSOLE_URL');
const token = env('CONSOLE_TOKEN');
const replaySeq = env('REPLAY_SEQ');
const eventSeq = env('EVENT_SEQ');
const traceId = env('TRACE_ID');
const shots = process.env.SCREENSHOT_DIR;
const TIMEOUT = 15_000;

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}
const step = (name) => console.log(name);

async function shot(page, name) {
  if (!shots) return;
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'hookbus-console-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env('CHROMIUM_BIN', '/usr/bin/chromium'),
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = false;
try {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  // Failed requests (the refused token's 401) are logged too: not page errors.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) pageErrors.push(m.text());
  });

  // Sign in: a wrong token is refused, the superuser's is taken.
  await page.goto(base);
  await page.locator('#login').waitFor();
  await page.fill('#token', 'hb_wrong');
  await page.click('#login-form button[type=submit]');
  await page.locator('#login-error', { hasText: 'invalid token' }).waitFor();
  check(await page.evaluate(() => sessionStorage.getItem('hookbus-console-token')) === null,
    'a refused token is not kept');
  await shot(page, 'login');
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
  await page.locator('#username', { hasText: 'admin' }).waitFor();
  step('signed-in');

  // Plugins: both, with shop-sync's dead letters, and the dispatch order. The
  // page is refreshed until it shows them (replicas answer $SRV.PING within
  // the console's ping timeout, which a busy machine may miss once).
  const pluginsShown = () => page.evaluate(() => {
    const cell = (id, i) => {
      const row = document.querySelector(`#plugins-table tr[data-plugin="${id}"]`);
      return row ? row.cells[i].textContent.trim() : null;
    };
    return cell('shop-sync', 6) === '3' && cell('audit', 1) === 'ok' && cell('shop-sync', 1) === 'ok';
  });
  const loaded = () => page.waitForFunction(() => {
    const text = document.querySelector('#plugins-summary').textContent;
    return text && !text.includes('loading');
  });
  await loaded();
  for (let tries = 0; !(await pluginsShown()); tries += 1) {
    check(tries < 10, `plugins page: ${await page.textContent('#plugins-table')}`);
    await page.click('#plugins-refresh');
    await loaded();
  }
  const sync = page.locator('#plugins-table tr[data-plugin="shop-sync"]');
  check((await sync.textContent()).includes('0.9.1'), 'shop-sync version shown');
  const order = await page.locator('#plugins-order .hook', { hasText: 'entry.after_create' })
    .locator('tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.handler));
  check(JSON.stringify(order) === JSON.stringify(['audit/record', 'shop-sync/push']),
    `entry.after_create order is priority order: ${order}`);
  const rate = await page.locator('#plugins-order tr[data-handler="shop-sync/push"] td').nth(7).textContent();
  check(rate.trim() === '100.0 %', `shop-sync/push error rate: ${rate}`);
  await shot(page, 'plugins');
  step('plugins');

  // Live tail: the stored events, then a filter, then a new event live.
  await page.click('[data-tab=tail]');
  await page.waitForFunction(() => document.querySelectorAll('#tail-table tbody tr').length >= 3);
  await page.fill('#tail-entity', 'customer');
  await page.fill('#tail-hook', 'entry.after_create');
  await page.click('#tail-start');
  await page.locator('#tail-status', { hasText: 'following: 2 event(s)' }).waitFor();
  const entities = await page.locator('#tail-table tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.entity));
  check(entities.length === 2 && entities.every((e) => e === 'customer'), `filtered tail: ${entities}`);
  step('tail-following');
  await page.locator('#tail-status', { hasText: 'following: 3 event(s)' }).waitFor();
  const first = page.locator('#tail-table tbody tr').first();
  check((await first.getAttribute('data-entity')) === 'customer', 'the live event is first');
  check((await first.textContent()).includes(traceId.slice(0, 13)), 'the live event shows its trace id');
  await shot(page, 'tail');
  step('tail-live');

  // Dead letters: three, two of them about customers.
  await page.click('#tail-stop');
  await page.click('[data-tab=dlq]');
  await page.waitForFunction(() => document.querySelectorAll('#dlq-table tbody tr[data-seq]').length === 3);
  await page.fill('#dlq-entity', 'customer');
  await page.click('#dlq-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#dlq-table tbody tr[data-seq]').length === 2);
  await page.fill('#dlq-entity', '');
  await page.fill('#dlq-hook', 'entry.after_update');
  await page.click('#dlq-form button[type=submit]');
  await page.locator('#dlq-summary', { hasText: '0 dead letter(s)' }).waitFor();
  // A legacy alias names the same hook.
  await page.fill('#dlq-hook', 'after_create_entry_v2');
  await page.click('#dlq-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#dlq-table tbody tr[data-seq]').length === 3);
  await page.fill('#dlq-hook', '');
  await shot(page, 'dead-letters');
  step('dead-letters');

  // The journey of the first event: trace id, audit/record done, shop-sync/push
  // dead-lettered after three attempts.
  await page.click(`#dlq-table tr[data-seq="${replaySeq}"] a.journey-link`);
  await page.locator('#journey-event .trace-id', { hasText: traceId }).waitFor();
  check((await page.inputValue('#journey-key')) === eventSeq, 'journey of the dead letter\'s event');
  await page.locator('#journey-handlers tr[data-handler="shop-sync/push"][data-status="dead_lettered"]').waitFor();
  const attempts = await page.locator('#journey-handlers tr[data-handler="shop-sync/push"] ol.attempts li').count();
  check(attempts === 3, `three failed attempts shown: ${attempts}`);
  check((await page.locator('#journey-handlers tr[data-handler="shop-sync/push"]').textContent()).includes('shop API answered 503'),
    'the error is shown');
  await page.locator('#journey-handlers tr[data-handler="audit/record"][data-status="succeeded"]').waitFor();
  await shot(page, 'journey');
  // The same event found by its id (the stream is read from its UUIDv7's time on).
  const eventId = (await page.locator('#journey-event dd.mono').first().textContent()).trim();
  await page.fill('#journey-key', eventId);
  await page.click('#journey-form button[type=submit]');
  await page.locator('#journey-event h3', { hasText: `#${eventSeq}` }).waitFor();
  await page.locator('#journey-handlers tr[data-handler="shop-sync/push"][data-status="dead_lettered"]').waitFor();
  await page.fill('#journey-key', '0193a6b2-0000-7000-8000-000000000000');
  await page.click('#journey-form button[type=submit]');
  await page.locator('#journey p.error', { hasText: 'no event 0193a6b2' }).waitFor();
  step('journey');

  // Replay it, after the confirmation (cancel first: nothing happens).
  await page.click('[data-tab=dlq]');
  const row = page.locator(`#dlq-table tr[data-seq="${replaySeq}"]`);
  await row.locator('button.replay').click();
  await page.locator('#confirm[open]').waitFor();
  await page.click('#confirm-cancel');
  check(await row.count() === 1, 'a cancelled replay keeps the dead letter');
  await row.locator('button.replay').click();
  await page.locator('#confirm[open]').waitFor();
  check((await page.textContent('#confirm-title')).includes(`#${replaySeq}`), 'the dialog names the dead letter');
  await shot(page, 'replay-confirm');
  await page.click('#confirm-ok');
  await page.locator('#dlq-result', { hasText: 'succeeded; the dead letter was removed' }).waitFor();
  await page.waitForFunction(() => document.querySelectorAll('#dlq-table tbody tr[data-seq]').length === 2);
  step('replayed');

  // Replay what a filter selects (the product's), after the confirmation that
  // counts them.
  await page.fill('#dlq-entity', 'product');
  await page.click('#dlq-form button[type=submit]');
  await page.waitForFunction(() => document.querySelectorAll('#dlq-table tbody tr[data-seq]').length === 1);
  await page.click('#dlq-replay');
  await page.locator('#confirm[open]').waitFor();
  check((await page.textContent('#confirm-title')) === 'Replay 1 dead letter(s)?',
    `bulk replay dialog: ${await page.textContent('#confirm-title')}`);
  await shot(page, 'bulk-replay-confirm');
  await page.click('#confirm-ok');
  await page.locator('#dlq-result', { hasText: "replayed 1 dead letter(s) of entity 'product': 1 succeeded, 0 failed again" }).waitFor();
  await page.locator('#dlq-table tbody', { hasText: 'no dead letter' }).waitFor();
  step('bulk-replayed');

  // Purge the rest of shop-sync's, after the confirmation that counts them.
  await page.fill('#dlq-entity', '');
  await page.fill('#dlq-plugin', 'shop-sync');
  await page.click('#dlq-purge');
  await page.locator('#confirm[open]').waitFor();
  check((await page.textContent('#confirm-title')) === 'Delete 1 dead letter(s)?',
    `purge dialog: ${await page.textContent('#confirm-title')}`);
  await page.click('#confirm-ok');
  await page.locator('#dlq-result', { hasText: 'purged 1 dead letter(s) of plugin shop-sync' }).waitFor();
  await page.locator('#dlq-table tbody', { hasText: 'no dead letter' }).waitFor();
  step('purged');

  // The journey now: shop-sync/push has no dead letter any more.
  await page.click('[data-tab=journey]');
  await page.fill('#journey-key', eventSeq);
  await page.click('#journey-form button[type=submit]');
  await page.locator('#journey-handlers tr[data-handler="shop-sync/push"][data-status="succeeded"]').waitFor();
  step('journey-after-replay');

  // Signing out forgets the token.
  await page.click('#signout');
  await page.locator('#login').waitFor();
  check(await page.evaluate(() => sessionStorage.getItem('hookbus-console-token')) === null,
    'signing out forgets the token');
  check(pageErrors.length === 0, `errors in the page: ${pageErrors.join('; ')}`);
  step('done');
} catch (e) {
  failed = true;
  console.error(e.stack || String(e));
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
