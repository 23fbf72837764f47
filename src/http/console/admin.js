// The admin views: the audit trail with its filters, and key management.
// Only shown for a key with the admin scope (the API refuses others anyway).

import { $, h, when, count, instant, notice } from './dom.js';
import { session, api, query, failed } from './api.js';

const AUDIT_PAGE = 100;

const state = {
  auditCursor: null,
  auditFilters: {},
  /// Counts audit loads: only the latest one's answer is shown, so a slow
  /// answer to an earlier filter never replaces a newer one.
  auditLoads: 0,
};

export function showAudit() {
  loadAudit(true);
}

async function loadAudit(fresh) {
  const generation = session.generation;
  const load = ++state.auditLoads;
  const list = $('audit-list');
  list.setAttribute('aria-busy', 'true');
  if (fresh) {
    state.auditCursor = null;
    state.auditFilters = {
      type: $('audit-type').value.trim(),
      key: $('audit-key').value.trim(),
      since: instant($('audit-since').value),
      until: instant($('audit-until').value),
    };
  }
  try {
    const page = await api('GET', `/admin/audit${query({ ...state.auditFilters, cursor: state.auditCursor, limit: AUDIT_PAGE })}`);
    if (generation !== session.generation || load !== state.auditLoads) return;
    const items = (page.events || []).map(auditItem);
    if (fresh) list.replaceChildren(...items);
    else list.append(...items);
    state.auditCursor = page.next_cursor || null;
    $('audit-more').hidden = !state.auditCursor;
    $('audit-empty').hidden = list.hasChildNodes();
  } catch (error) {
    if (load === state.auditLoads) failed(error);
  } finally {
    if (load === state.auditLoads) list.setAttribute('aria-busy', 'false');
  }
}

/// The fields of an audit event worth a glance; the rest is behind "details".
function auditSummary(event) {
  const data = event.data || {};
  const parts = [];
  for (const field of ['key_id', 'name', 'actor', 'action', 'target', 'by', 'reason', 'limit', 'count', 'key_prefix', 'channel', 'conversation_id', 'subject_id']) {
    if (data[field] !== undefined && data[field] !== null) parts.push(`${field}: ${data[field]}`);
  }
  return parts.join(' · ');
}

function auditItem(event) {
  return h(
    'li',
    { class: `audit-item type-${event.type}`, 'data-type': event.type, 'data-seq': event.seq },
    h(
      'div',
      { class: 'audit-head' },
      h('span', { class: 'audit-type', text: event.type }),
      h('time', { datetime: event.at, text: when(event.at) }),
      h('span', { class: 'audit-seq', text: `#${event.seq}` }),
    ),
    h('div', { class: 'audit-summary', text: auditSummary(event) }),
    h('details', {}, h('summary', { text: 'details' }), h('pre', { text: JSON.stringify(event, null, 2) })),
  );
}

// ---- keys ----

export async function showKeys() {
  const generation = session.generation;
  try {
    const listed = await api('GET', '/admin/keys');
    if (generation !== session.generation) return;
    renderKeys(listed.keys || []);
  } catch (error) {
    failed(error);
  }
}

function keyState(key) {
  if (key.revoked) return `revoked ${when(key.revoked.at)}${key.revoked.reason ? ` (${key.revoked.reason})` : ''}`;
  if (key.expires_at && Date.parse(key.expires_at) <= Date.now()) return `expired ${when(key.expires_at)}`;
  return key.expires_at ? `active, expires ${when(key.expires_at)}` : 'active';
}

function limitsText(limits) {
  const l = limits || {};
  const parts = [];
  if (l.rpm) parts.push(`${count(l.rpm)} rpm`);
  if (l.tpm) parts.push(`${count(l.tpm)} tpm`);
  if (l.max_parallel) parts.push(`${count(l.max_parallel)} parallel`);
  return parts.join(' · ') || 'unlimited';
}

function renderKeys(keys) {
  const head = h('tr', {}, ...['key id', 'name', 'owner', 'scopes', 'limits', 'issued', 'state', ''].map((t) => h('th', { scope: 'col', text: t })));
  const rows = keys.map((key) => {
    const action = h('td', { class: 'actions' });
    const active = !key.revoked && !(key.expires_at && Date.parse(key.expires_at) <= Date.now());
    if (key.key_id === (session.usage && session.usage.key_id)) {
      action.append(h('span', { class: 'hint', text: 'this key' }));
    } else if (active) {
      action.append(h('button', { type: 'button', class: 'danger', text: 'Revoke', 'data-key': key.key_id, onclick: () => askRevoke(action, key) }));
    }
    return h(
      'tr',
      { class: key.revoked ? 'revoked' : '', 'data-key': key.key_id },
      h('td', { 'data-label': 'key id' }, h('code', { text: key.key_id })),
      h('td', { 'data-label': 'name', text: key.name }),
      h('td', { 'data-label': 'owner', text: key.owner || '—' }),
      h('td', { 'data-label': 'scopes', text: (key.scopes || []).join(', ') }),
      h('td', { 'data-label': 'limits', text: limitsText(key.limits) }),
      h('td', { 'data-label': 'issued', text: when(key.issued_at) }),
      h('td', { 'data-label': 'state', class: 'state', text: keyState(key) }),
      action,
    );
  });
  $('keys-table').replaceChildren(h('thead', {}, head), h('tbody', {}, ...rows));
}

/// Revoking is final, so it takes a second click, with an optional reason.
function askRevoke(cell, key) {
  const reason = h('input', { type: 'text', placeholder: 'reason (optional)', 'aria-label': `Reason to revoke ${key.key_id}`, maxlength: 256 });
  const confirm = h('button', {
    type: 'button',
    class: 'danger',
    text: 'Confirm revoke',
    onclick: async () => {
      confirm.disabled = true;
      try {
        await api('DELETE', `/admin/keys/${encodeURIComponent(key.key_id)}${query({ reason: reason.value.trim() })}`);
        notice(`Key ${key.key_id} (${key.name}) is revoked.`, 'info');
        showKeys();
      } catch (error) {
        confirm.disabled = false;
        failed(error);
      }
    },
  });
  const cancel = h('button', { type: 'button', class: 'link', text: 'cancel', onclick: () => showKeys() });
  cell.replaceChildren(reason, confirm, cancel);
  reason.focus();
}

async function issueKey(event) {
  event.preventDefault();
  const scopes = [];
  if ($('issue-chat').checked) scopes.push('chat');
  if ($('issue-admin').checked) scopes.push('admin');
  const body = { name: $('issue-name').value.trim(), scopes };
  const owner = $('issue-owner').value.trim();
  if (owner) body.owner = owner;
  const limits = {};
  for (const [field, id] of [['rpm', 'issue-rpm'], ['tpm', 'issue-tpm'], ['max_parallel', 'issue-parallel']]) {
    const value = $(id).value.trim();
    if (value) limits[field] = Number(value);
  }
  if (Object.keys(limits).length) body.limits = limits;
  const expires = instant($('issue-expires').value);
  if (expires) body.expires_at = expires;
  try {
    const issued = await api('POST', '/admin/keys', body);
    $('issued-key').textContent = issued.key;
    $('issued').hidden = false;
    $('issue-form').reset();
    showKeys();
  } catch (error) {
    failed(error);
  }
}

async function copyIssued() {
  const key = $('issued-key').textContent;
  try {
    await navigator.clipboard.writeText(key);
    notice('Copied.', 'info');
  } catch {
    // No clipboard API (plain http): select it for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($('issued-key'));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
}

/// Hooks the audit and keys views' controls up; once, at start.
export function wireAdmin() {
  $('audit-form').addEventListener('submit', (event) => {
    event.preventDefault();
    loadAudit(true);
  });
  $('audit-clear').addEventListener('click', () => {
    $('audit-form').reset();
    loadAudit(true);
  });
  $('audit-more').addEventListener('click', () => loadAudit(false));
  $('issue-form').addEventListener('submit', issueKey);
  $('issued-copy').addEventListener('click', copyIssued);
}

/// Forgets what the last key could see; a key shown once is gone.
export function resetAdmin() {
  $('issued-key').textContent = '';
  $('issued').hidden = true;
  $('audit-list').replaceChildren();
  $('keys-table').replaceChildren();
}
