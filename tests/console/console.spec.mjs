// The console (GET /) in a real headless Chromium against a running
// `switchboard serve`: scripts/console-test starts the server, issues a chat
// key and runs this with node's test runner.
//
// Env: CONSOLE_URL, CONSOLE_ADMIN_KEY, CONSOLE_CHAT_KEY, CONSOLE_MODEL_PORT
// (where the "slow" agent's model server must listen), CONSOLE_SCREENSHOTS
// (a failing scenario's screenshot goes there; every scenario's too with
// CONSOLE_SCREENSHOTS_ALWAYS=1), CHROMIUM (the browser binary).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run scripts/console-test)`);
  return value;
};
const BASE = env('CONSOLE_URL');
const ADMIN_KEY = env('CONSOLE_ADMIN_KEY');
const CHAT_KEY = env('CONSOLE_CHAT_KEY');
const MODEL_PORT = Number(env('CONSOLE_MODEL_PORT'));
const SHOTS = process.env.CONSOLE_SCREENSHOTS || path.resolve('target/console-screenshots');
const ALWAYS_SHOOT = process.env.CONSOLE_SCREENSHOTS_ALWAYS === '1';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

let browser;

// ---- the "slow" agent's model server ----------------------------------------
// An OpenAI-compatible /v1/chat/completions that streams "slow reply " at once
// and holds "done." until the test opens the gate: so the page can be seen
// showing part of a reply while the rest does not exist yet.

const model = {
  server: null,
  requests: 0,
  gate: null,
};

function deferred() {
  let resolve;
  const promise = new Promise((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

function startModelServer() {
  model.gate = deferred();
  model.gate.resolve();
  model.server = http.createServer(async (request, response) => {
    if (request.method !== 'POST' || !request.url.endsWith('/chat/completions')) {
      response.writeHead(404, { 'Content-Type': 'application/json' });
      response.end('{"error":{"message":"not here"}}');
      return;
    }
    for await (const _ of request) {
      // The prompt does not matter.
    }
    model.requests += 1;
    const base = { id: 'chatcmpl-console', object: 'chat.completion.chunk', created: Math.floor(Date.now() / 1000), model: 'slow-model' };
    const chunk = (fields) => response.write(`data: ${JSON.stringify({ ...base, ...fields })}\n\n`);
    response.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    chunk({ choices: [{ index: 0, delta: { role: 'assistant', content: 'slow ' }, finish_reason: null }] });
    chunk({ choices: [{ index: 0, delta: { content: 'reply ' }, finish_reason: null }] });
    await model.gate.promise;
    chunk({ choices: [{ index: 0, delta: { content: 'done.' }, finish_reason: null }] });
    chunk({ choices: [{ index: 0, delta: {}, finish_reason: 'stop' }] });
    chunk({ choices: [], usage: { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 } });
    response.end('data: [DONE]\n\n');
  });
  return new Promise((resolve, reject) => {
    model.server.once('error', reject);
    model.server.listen(MODEL_PORT, '127.0.0.1', resolve);
  });
}

// ---- helpers --------------------------------------------------------------------

before(async () => {
  fs.mkdirSync(SHOTS, { recursive: true });
  await startModelServer();
  // launch() gives the browser a fresh, temporary user-data dir of its own.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    // This machine's closed network: nothing may try to reach the outside.
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  model.gate?.resolve();
  model.server?.closeAllConnections();
  await new Promise((resolve) => (model.server ? model.server.close(resolve) : resolve()));
});

/// Runs `scenario` in a fresh browser context (fresh session storage). Fails
/// on any page error or CSP refusal; screenshots the page when it fails.
async function withPage(name, viewport, scenario) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    // A refused request (401, 403, 404) is logged by Chromium itself and is
    // expected here; script errors and CSP refusals are not.
    if (message.type() === 'error' && !message.text().startsWith('Failed to load resource')) {
      problems.push(`console: ${message.text()}`);
    }
  });
  try {
    await scenario(page);
    assert.deepEqual(problems, [], 'no script errors or CSP refusals');
    if (ALWAYS_SHOOT) await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
  } catch (error) {
    const file = path.join(SHOTS, `${name}-failed.png`);
    await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    console.error(`screenshot: ${file}`);
    if (problems.length) console.error(problems.join('\n'));
    throw error;
  } finally {
    await context.close();
  }
}

/// A screenshot of a stage worth looking at, with CONSOLE_SCREENSHOTS_ALWAYS=1.
async function shot(page, name) {
  if (ALWAYS_SHOOT) await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function login(page, key) {
  await page.goto(BASE);
  await page.locator('#login-key').fill(key);
  await page.getByRole('button', { name: 'Use this key' }).click();
  await page.locator('#app').waitFor({ state: 'visible' });
}

/// Resolves with `selector`'s text once it matches `pattern`.
async function waitForText(page, selector, pattern) {
  await page.waitForFunction(
    ({ selector, source, flags }) => {
      const el = document.querySelector(selector);
      return el && new RegExp(source, flags).test(el.textContent);
    },
    { selector, source: pattern.source, flags: pattern.flags },
  );
  return page.locator(selector).textContent();
}

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/// Records every text the newest assistant bubble shows, as it changes.
async function recordReplyStates(page) {
  await page.evaluate(() => {
    window.__replyStates = [];
    const messages = document.getElementById('messages');
    new MutationObserver(() => {
      const bubbles = messages.querySelectorAll('.msg.assistant .text');
      const last = bubbles[bubbles.length - 1];
      if (last) window.__replyStates.push(last.textContent);
    }).observe(messages, { subtree: true, childList: true, characterData: true });
  });
}

async function sendMessage(page, text, agent = '') {
  await page.locator('#composer-agent').fill(agent);
  await page.locator('#composer-text').fill(text);
  await page.locator('#composer-text').press('Enter');
}

async function lastReply(page, expected) {
  await page.waitForFunction((expected) => {
    const replies = document.querySelectorAll('#messages .msg.assistant');
    const last = replies[replies.length - 1];
    return last && !last.classList.contains('streaming') && last.querySelector('.text').textContent === expected;
  }, expected);
}

async function assertNoHorizontalOverflow(page, where) {
  const { scrollWidth, innerWidth } = await page.evaluate(() => ({
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
  }));
  assert.ok(scrollWidth <= innerWidth, `${where}: the page is ${scrollWidth}px wide in a ${innerWidth}px viewport`);
}

async function apiGet(pathname, key) {
  const response = await fetch(`${BASE}${pathname}`, { headers: { Authorization: `Bearer ${key}` } });
  assert.equal(response.status, 200, `${pathname}: ${response.status}`);
  return response.json();
}

function usd(micros) {
  const whole = Math.floor(micros / 1e6);
  return `$${String(whole).replace(/\B(?=(\d{3})+(?!\d))/g, ',')}.${String(micros % 1e6).padStart(6, '0')}`;
}

/// The budget cards' dollars: two to six decimals ("$1.00", "$0.000125").
const dollars = (micros) => usd(micros).replace(/(\.\d\d\d*?)0+$/, '$1');

/// A JSON call that must succeed; its body.
async function apiCall(method, pathname, key, body) {
  const response = await fetch(`${BASE}${pathname}`, {
    method,
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await response.json();
  assert.ok(response.ok, `${method} ${pathname}: ${response.status} ${JSON.stringify(json)}`);
  return json;
}

// ---- scenarios ---------------------------------------------------------------------

test('the page loads its own assets only, under the CSP', async () => {
  // Each body is read to its end, so no socket is left open to keep node alive.
  const get = async (pathname) => {
    const response = await fetch(`${BASE}${pathname}`);
    return { status: response.status, headers: response.headers, body: await response.text() };
  };
  const page = await get('/');
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  assert.match(page.headers.get('content-security-policy'), /script-src 'self'/);
  assert.doesNotMatch(page.body, /https?:\/\//, 'nothing is loaded from elsewhere');
  const script = await get('/console/app.js');
  assert.match(script.headers.get('content-type'), /^text\/javascript/);
  const style = await get('/console/app.css');
  assert.match(style.headers.get('content-type'), /^text\/css/);
});

test('a chat key: a bad key is refused, then a message streams its reply and the conversation is listed', async () => {
  await withPage('chat-desktop', DESKTOP, async (page) => {
    await page.goto(BASE);
    await page.locator('#login-key').fill('sb-not-a-real-key-000000');
    await page.getByRole('button', { name: 'Use this key' }).click();
    await waitForText(page, '#login-error', /unknown API key/);

    await login(page, CHAT_KEY);
    assert.equal(await page.locator('.tabs a[data-view="audit"]').isVisible(), false, 'no audit tab for a chat key');
    assert.equal(await page.locator('.tabs a[data-view="keys"]').isVisible(), false, 'no keys tab for a chat key');
    await waitForText(page, '#health-ready', /^ready$/);
    await waitForText(page, '#health-bus', /^bus: connected$/);
    await waitForText(page, '#health-log', /^log: #\d+/);

    await recordReplyStates(page);
    await page.getByRole('button', { name: 'New' }).click();
    const words = 'one two three four five six seven';
    await sendMessage(page, words);
    const final = `echo: ${words}`;
    await lastReply(page, final);
    const states = await page.evaluate(() => window.__replyStates);
    const partial = states.filter((text) => text.length > 0 && text !== final && final.startsWith(text));
    assert.ok(partial.length > 0, `a partial reply was shown before the whole one: ${JSON.stringify(states)}`);

    const id = decodeURIComponent((await page.evaluate(() => location.hash)).replace('#/chat/', ''));
    assert.match(id, /^web-[a-z0-9]+$/);
    const item = page.locator(`#conversation-list a[data-id="${id}"]`);
    await item.waitFor();
    await waitForText(page, `#conversation-list a[data-id="${id}"] .conv-meta`, /^2 messages/);

    // The key is kept for the tab: a reload shows the conversation, from the history.
    await page.reload();
    await page.locator('#app').waitFor({ state: 'visible' });
    await page.locator('#messages .msg.assistant').first().waitFor();
    assert.equal(await page.locator('#messages .msg.user .text').first().textContent(), words);
    assert.equal(await page.locator('#messages .msg.assistant .text').first().textContent(), final);

    // An admin view asked for by address falls back to the chat for this key.
    await page.evaluate(() => {
      location.hash = '#/keys';
    });
    await page.locator('#view-chat').waitFor({ state: 'visible' });
    assert.equal(await page.locator('#view-keys').isVisible(), false);

    // "forget key" drops it from the tab: a reload asks for a key again.
    await page.getByRole('button', { name: 'forget key' }).click();
    await page.locator('#login').waitFor({ state: 'visible' });
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    await page.reload();
    await page.locator('#login').waitFor({ state: 'visible' });
    assert.equal(await page.locator('#app').isVisible(), false);
  });
});

test('a reply is shown while the model is still writing it', async () => {
  await withPage('chat-streaming', DESKTOP, async (page) => {
    await login(page, CHAT_KEY);
    await page.getByRole('button', { name: 'New' }).click();
    model.gate = deferred();
    const served = model.requests;
    try {
      await sendMessage(page, 'tell me slowly', 'slow');
      // The model server has sent "slow reply " and holds the rest.
      await page.waitForFunction(() => {
        const last = document.querySelector('#messages .msg.assistant:last-child');
        return last && last.classList.contains('streaming') && last.querySelector('.text').textContent === 'slow reply ';
      });
      assert.equal(model.requests, served + 1, 'the model server was called once');
      await shot(page, 'chat-streaming-partial');
    } finally {
      // Never leave the turn hanging for the scenarios after this one.
      model.gate.resolve();
    }
    await lastReply(page, 'slow reply done.');
    await waitForText(page, '#messages .msg.assistant:last-child .meta', /^slow/);
  });
});

test('a long conversation opens at its newest messages and loads earlier ones on request', async () => {
  const id = `long-${Date.now()}`;
  // 51 turns: 102 messages, more than the thread's page of 100.
  for (let i = 0; i < 51; i += 1) {
    await apiCall('POST', `/v1/conversations/${id}/messages`, CHAT_KEY, { content: `turn ${i}` });
  }
  // Turns run concurrently, so the replies are stored in the order they
  // end (turn 49's may come after turn 50's): wait for every one of them, and
  // expect the thread in the log's order.
  let all = [];
  for (let tries = 0; ; tries += 1) {
    all = (await apiGet(`/v1/conversations/${id}`, CHAT_KEY)).messages.map((m) => m.content);
    if (all.length === 102) break;
    assert.ok(tries < 200, `not every reply came: ${all.length} messages`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.equal(all.filter((content) => content.startsWith('echo: turn ')).length, 51);
  assert.ok(all.includes('echo: turn 50'));
  await withPage('chat-long', DESKTOP, async (page) => {
    await login(page, CHAT_KEY);
    await page.evaluate((id) => {
      location.hash = `#/chat/${id}`;
    }, id);
    const earlier = page.locator('#messages-earlier');
    await earlier.waitFor();
    assert.equal(await page.locator('#messages .msg').count(), 100);
    assert.equal(await page.locator('#messages .msg .text').first().textContent(), all[2]);
    assert.equal(await page.locator('#messages .msg .text').last().textContent(), all[101]);
    await earlier.click();
    await page.waitForFunction(() => document.querySelectorAll('#messages .msg').length === 102);
    assert.deepEqual(await page.locator('#messages .msg .text').allTextContents(), all);
    assert.equal(await page.locator('#messages-earlier').count(), 0, 'nothing earlier is left');
    await shot(page, 'chat-long');
  });
});

test('on a phone-width screen, chat works and nothing scrolls sideways', async () => {
  await withPage('chat-phone', PHONE, async (page) => {
    await login(page, CHAT_KEY);
    await assertNoHorizontalOverflow(page, 'the conversation list');
    assert.equal(await page.locator('#messages').isVisible(), false, 'the list comes first on a phone');
    await page.getByRole('button', { name: 'New' }).click();
    await sendMessage(page, 'a message typed on a phone with a rather long line of text in it, longer than the screen is wide');
    await lastReply(page, 'echo: a message typed on a phone with a rather long line of text in it, longer than the screen is wide');
    await assertNoHorizontalOverflow(page, 'the chat');
    await shot(page, 'chat-phone-thread');
    await page.getByRole('button', { name: '‹ Conversations' }).click();
    await page.locator('#conversation-list a').first().waitFor();
    await assertNoHorizontalOverflow(page, 'the list after a chat');
    await page.getByRole('link', { name: 'Costs' }).click();
    await waitForText(page, '#usage', /requests/);
    await assertNoHorizontalOverflow(page, 'the costs view');
  });
});

test('an admin key: costs with charts and totals, a key revoked, and the audit trail shows it', async () => {
  const expected = await apiGet('/admin/costs?by=model', ADMIN_KEY);
  const totalMicros = expected.rows.reduce((sum, row) => sum + row.cost_micros, 0);
  assert.ok(totalMicros > 0, 'the earlier scenarios spent something');

  await withPage('admin-desktop', DESKTOP, async (page) => {
    await login(page, ADMIN_KEY);
    assert.ok(await page.locator('.tabs a[data-view="audit"]').isVisible(), 'the audit tab');
    assert.ok(await page.locator('.tabs a[data-view="keys"]').isVisible(), 'the keys tab');

    await page.getByRole('link', { name: 'Costs' }).click();
    await page.locator('#chart-day svg rect.bar').first().waitFor();
    await page.locator('#chart-model svg rect.bar').first().waitFor();
    assert.ok((await page.locator('#chart-model svg rect.bar').count()) >= 2, 'a bar for echo and one for slow-model');
    const barHeight = await page.locator('#chart-day svg rect.bar').first().getAttribute('height');
    assert.ok(Number(barHeight) > 0, `the day's bar has a height (${barHeight})`);
    const totals = await waitForText(page, '#costs-totals', /total spend/);
    assert.ok(totals.includes(usd(totalMicros)), `the total ${usd(totalMicros)} is shown: ${totals}`);
    const models = await page.locator('#table-model').textContent();
    assert.ok(models.includes('echo') && models.includes('slow-model'), models);
    await shot(page, 'admin-costs');

    // Issue a key in the keys view, then revoke it there.
    await page.getByRole('link', { name: 'Keys' }).click();
    await page.locator('#keys-table tbody tr').first().waitFor();
    await page.locator('#issue-name').fill('doomed');
    await page.locator('#issue-owner').fill('console-test');
    await page.getByRole('button', { name: 'Issue' }).click();
    const issuedKey = await waitForText(page, '#issued-key', /^sb-/);
    const row = page.locator('#keys-table tbody tr', { hasText: 'doomed' });
    await row.waitFor();
    const doomedId = await row.getAttribute('data-key');
    await row.getByRole('button', { name: 'Revoke' }).click();
    await row.getByRole('textbox').fill('console test');
    await row.getByRole('button', { name: 'Confirm revoke' }).click();
    await waitForText(page, '#notice-text', new RegExp(`Key ${escapeRegExp(doomedId)} .*revoked`));
    await waitForText(page, `#keys-table tr[data-key="${doomedId}"] .state`, /^revoked/);
    await shot(page, 'admin-keys');

    await page.getByRole('link', { name: 'Audit' }).click();
    await page.locator('#audit-type').fill('key_revoked');
    await page.getByRole('button', { name: 'Filter' }).click();
    // The filtered answer is in once the list is no longer busy (the tab's
    // own unfiltered load may still be on its way, and must not win).
    await page.locator('#audit-list[aria-busy="false"]').waitFor();
    const revoked = page.locator('#audit-list .audit-item[data-type="key_revoked"]', { hasText: doomedId });
    await revoked.waitFor();
    const summary = await revoked.locator('.audit-summary').textContent();
    assert.ok(summary.includes('reason: console test'), summary);
    assert.equal(await page.locator('#audit-list .audit-item:not([data-type="key_revoked"])').count(), 0, 'the filter applies');

    // The revoked key no longer opens the console, and the page says why.
    const other = await browser.newContext({ viewport: DESKTOP });
    try {
      const second = await other.newPage();
      await second.goto(BASE);
      await second.locator('#login-key').fill(issuedKey);
      await second.getByRole('button', { name: 'Use this key' }).click();
      await waitForText(second, '#login-error', /revoked/);
    } finally {
      await other.close();
    }
  });
});

test('on a phone-width screen, the admin views fit too', async () => {
  await withPage('admin-phone', PHONE, async (page) => {
    await login(page, ADMIN_KEY);
    for (const [tab, ready] of [
      ['Costs', '#chart-model svg rect.bar'],
      ['Audit', '#audit-list .audit-item'],
      ['Keys', '#keys-table tbody tr'],
    ]) {
      await page.getByRole('link', { name: tab }).click();
      await page.locator(ready).first().waitFor();
      await assertNoHorizontalOverflow(page, `the ${tab} view`);
      await shot(page, `admin-phone-${tab.toLowerCase()}`);
    }
  });
});

test('a key with budgets: the costs view shows them, and a spent budget refuses a send with the server\'s message', async () => {
  // scripts/console-test gives the user "console-budget" $5 a month.
  const issued = await apiCall('POST', '/admin/keys', ADMIN_KEY, {
    name: 'console budget',
    owner: 'console-budget',
    scopes: ['chat'],
    limits: { rpm: 30 },
    budget: { micros: 1_000_000, period: 'day' },
  });
  const keyCard = '#budgets li.budget[data-scope="key"]';
  const userCard = '#budgets li.budget[data-scope="user"]';
  const text = (page, selector) => page.locator(selector).textContent();
  const fillWidth = async (page, card) => Number(await page.locator(`${card} .budget-bar svg rect.budget-fill`).getAttribute('width'));

  await withPage('budget-phone', PHONE, async (page) => {
    await login(page, issued.key);
    await page.getByRole('link', { name: 'Costs' }).click();
    await waitForText(page, `${keyCard} .budget-figures`, /spent/);
    assert.equal(await text(page, `${keyCard} .budget-whose`), 'this key');
    assert.equal(await text(page, `${keyCard} .budget-period`), 'per day');
    assert.equal(await text(page, `${keyCard} .budget-figures`), '$0.00 of $1.00 spent · $1.00 left');
    assert.equal(await fillWidth(page, keyCard), 0, 'an empty bar');
    assert.equal(await text(page, `${userCard} .budget-whose`), 'user console-budget');
    assert.equal(await text(page, `${userCard} .budget-period`), 'per month');
    assert.equal(await text(page, `${userCard} .budget-figures`), '$0.00 of $5.00 spent · $5.00 left');
    assert.equal(await page.locator('#budgets li.budget.exhausted').count(), 0);
    assert.ok((await text(page, '#usage')).includes('30 of 30 requests'), 'the requests left this minute');
    assert.equal(await page.locator('#budgets-none').isVisible(), false);
    await assertNoHorizontalOverflow(page, 'the budgets');
    await shot(page, 'budget-phone-fresh');

    // One send spends a little of both budgets.
    await page.getByRole('link', { name: 'Chat' }).click();
    await page.getByRole('button', { name: 'New' }).click();
    await sendMessage(page, 'spend a little');
    await lastReply(page, 'echo: spend a little');
    const usage = await apiGet('/v1/usage', issued.key);
    const spent = usage.spent.cost_micros;
    assert.ok(spent > 0 && spent < 1_000_000, `the echo agent has a price (${spent} micro-USD)`);
    assert.deepEqual(
      usage.budgets.map((b) => [b.scope, b.spent_micros]),
      [['key', spent], ['user', spent]],
    );

    await page.getByRole('link', { name: 'Costs' }).click();
    await waitForText(page, `${keyCard} .budget-figures`, new RegExp(`^${escapeRegExp(dollars(spent))} of`));
    assert.equal(await text(page, `${keyCard} .budget-figures`), `${dollars(spent)} of $1.00 spent · ${dollars(1_000_000 - spent)} left`);
    assert.equal(await text(page, `${userCard} .budget-figures`), `${dollars(spent)} of $5.00 spent · ${dollars(5_000_000 - spent)} left`);
    const width = await fillWidth(page, keyCard);
    // The spent share, or a sliver of 1 % for a spend below it.
    const share = Math.max(1, spent / 1e4);
    assert.ok(Math.abs(width - share) < 1e-9, `the bar is the spent share (${width} for ${spent} of 1,000,000)`);
    assert.match(await text(page, `${keyCard} .budget-note`), spent < 10_000 ? /^< 1 % spent · day from / : /^\d+ % spent · day from /);
    assert.match(await text(page, '#usage'), /29 of 30 requests · full again in \d+\.\d s/);

    // A budget below what the key spent: the next send is refused.
    const budget = Math.max(1, Math.floor(spent / 2));
    await apiCall('PATCH', `/admin/keys/${encodeURIComponent(issued.key_id)}`, ADMIN_KEY, {
      budget: { micros: budget, period: 'total' },
    });
    await page.getByRole('link', { name: 'Chat' }).click();
    await page.getByRole('button', { name: 'New' }).click();
    await sendMessage(page, 'one more');
    const refusal = new RegExp(`the total budget of key ${escapeRegExp(issued.key_id)} is spent`);
    const shown = await waitForText(page, '#notice-text', refusal);
    await waitForText(page, '#messages .msg.user.failed .meta', refusal);
    assert.equal(await page.locator('#messages .msg.assistant').count(), 0, 'no reply to a refused send');
    // What the page shows is the server's own message.
    const direct = await fetch(`${BASE}/v1/conversations/budget-direct/messages`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${issued.key}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ content: 'and another' }),
    });
    const refused = await direct.json();
    assert.equal(direct.status, 429);
    assert.equal(refused.error.code, 'budget_exceeded');
    assert.ok(shown.startsWith(refused.error.message), `${JSON.stringify(shown)} shows ${JSON.stringify(refused.error.message)}`);
    await assertNoHorizontalOverflow(page, 'the refused send');
    await shot(page, 'budget-phone-refused');

    // The spent budget: nothing left, the bar full (not past it) and marked.
    await page.getByRole('link', { name: 'Costs' }).click();
    await waitForText(page, `${keyCard} .budget-period`, /^in total$/);
    assert.equal(await text(page, `${keyCard} .budget-figures`), `${dollars(spent)} of ${dollars(budget)} spent · $0.00 left`);
    assert.equal(await fillWidth(page, keyCard), 100, 'the bar stops at 100 %');
    assert.ok(await page.locator(`${keyCard}.exhausted`).isVisible(), 'the spent budget is marked');
    assert.match(await text(page, `${keyCard} .budget-note`), /^100 % spent · sends are refused$/);
    assert.equal(await page.locator(`${userCard}.exhausted`).count(), 0, "the user's budget is not spent");
    await assertNoHorizontalOverflow(page, 'the spent budget');
    await shot(page, 'budget-phone-spent');
  });
});
