// The switchboard console: a plain client of the HTTP API (DESIGN §7).
//
// No framework and no build step: these modules are embedded in the binary
// as they are written. This one holds the key, the health strip and the
// routing between views (#/chat, #/costs, #/audit, #/keys).

import { $, h, count, clearNotice } from './dom.js';
import { session, ApiError, api } from './api.js';
import { showChat, wireChat, resetChat } from './chat.js';
import { showCosts, wireCosts, resetCosts } from './costs.js';
import { showAudit, showKeys, wireAdmin, resetAdmin } from './admin.js';

const KEY_STORE = 'switchboard.key';
const HEALTH_EVERY_MS = 5000;

// ---- health strip ------------------------------------------------------------

async function pollHealth() {
  if (document.visibilityState === 'hidden') return;
  const set = (id, text, cls) => {
    $(id).textContent = text;
    $(id).className = cls || '';
  };
  try {
    const response = await fetch('/readyz', { cache: 'no-store' });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      set('health-ready', 'ready', 'ok');
      set('health-bus', 'bus: connected', 'ok');
      set('health-actors', `live actors: ${count(body.live_conversations)} · turns: ${count(body.turns_in_flight)}`);
      const behind = Number(body.log_head) - Number(body.projections_at);
      set('health-log', `log: #${count(body.log_head)}${behind > 0 ? ` (views at #${count(body.projections_at)})` : ''}`);
    } else {
      const why = body && body.error && body.error.message;
      set('health-ready', 'not ready', 'bad');
      set('health-bus', `bus: ${why || 'unavailable'}`, 'bad');
    }
  } catch {
    set('health-ready', 'server unreachable', 'bad');
    set('health-bus', 'bus: unknown', 'bad');
  }
}

// ---- the key ----

async function useKey(key) {
  session.key = key;
  const usage = await api('GET', '/v1/usage');
  sessionStorage.setItem(KEY_STORE, key);
  session.usage = usage;
  session.isAdmin = Array.isArray(usage.scopes) && usage.scopes.includes('admin');
  const name = usage.name && usage.name !== usage.key_id ? `${usage.name} · ${usage.key_id}` : usage.key_id;
  $('whoami').textContent = `${name}${session.isAdmin ? ' (admin)' : ''}`;
  for (const el of document.querySelectorAll('.admin-only')) el.hidden = !session.isAdmin;
  $('login').hidden = true;
  $('app').hidden = false;
  loadAgents();
  route();
}

function showLogin(message) {
  session.key = null;
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('login-error').hidden = !message;
  $('login-key').focus();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  resetChat();
  resetCosts();
  resetAdmin();
  clearNotice();
  $('login-key').value = '';
  location.hash = '';
  showLogin();
}

async function loadAgents() {
  try {
    const models = await api('GET', '/v1/models');
    const names = (models && Array.isArray(models.data) ? models.data : []).map((m) => m.id);
    $('agent-names').replaceChildren(...names.map((name) => h('option', { value: name })));
  } catch {
    // Optional: the agent can still be typed.
  }
}

// ---- routing ----

function route() {
  if (!session.key) return;
  const [view, arg] = location.hash.replace(/^#\/?/, '').split('/');
  const wanted = ['chat', 'costs', 'audit', 'keys'].includes(view) ? view : 'chat';
  const allowed = wanted === 'audit' || wanted === 'keys' ? session.isAdmin : true;
  const name = allowed ? wanted : 'chat';
  session.generation += 1;
  session.view = name;
  for (const section of document.querySelectorAll('.view')) section.hidden = section.id !== `view-${name}`;
  for (const tab of document.querySelectorAll('.tabs a')) {
    if (tab.dataset.view === name) tab.setAttribute('aria-current', 'page');
    else tab.removeAttribute('aria-current');
  }
  if (name === 'chat') showChat(arg ? decodeURIComponent(arg) : null);
  if (name === 'costs') showCosts();
  if (name === 'audit') showAudit();
  if (name === 'keys') showKeys();
}

// ---- start ----

function start() {
  $('notice-close').addEventListener('click', clearNotice);
  $('login-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const key = $('login-key').value.trim();
    if (!key) return;
    $('login-error').hidden = true;
    try {
      await useKey(key);
      $('login-key').value = '';
      clearNotice();
    } catch (error) {
      showLogin(error.message);
    }
  });
  $('logout').addEventListener('click', forgetKey);
  wireChat();
  wireCosts();
  wireAdmin();
  window.addEventListener('hashchange', route);
  document.addEventListener('visibilitychange', pollHealth);

  pollHealth();
  setInterval(pollHealth, HEALTH_EVERY_MS);

  const stored = sessionStorage.getItem(KEY_STORE);
  if (!stored) {
    showLogin();
    return;
  }
  useKey(stored).catch((error) => {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      sessionStorage.removeItem(KEY_STORE);
    }
    showLogin(error.message);
  });
}

start();
