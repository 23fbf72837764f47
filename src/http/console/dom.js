// Building the page and formatting what it shows.
//
// Markup is made with DOM calls only, never parsed from strings, so no text
// that came from the API can turn into HTML; the CSP forbids inline style
// attributes, so styles come from classes in app.css.

const SVG_NS = 'http://www.w3.org/2000/svg';

export const $ = (id) => document.getElementById(id);

/// An element: `h('li', {class: 'x', text: 'hi', onclick: f}, child…)`.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

/// An SVG element, likewise.
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'text') el.textContent = value;
    else if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
}

// ---- formatting ----

const groupThousands = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ',');

/// Integer micro-USD as dollars with all six decimals: exact.
export function usd(micros) {
  const m = Math.max(0, Math.trunc(Number(micros) || 0));
  const whole = Math.floor(m / 1e6);
  const fraction = String(m % 1e6).padStart(6, '0');
  return `$${groupThousands(String(whole))}.${fraction}`;
}

/// Integer micro-USD rounded for a chart axis or label: cents from a
/// dollar up, otherwise the significant micro digits.
export function usdShort(micros) {
  const m = Math.max(0, Math.round(Number(micros) || 0));
  if (m === 0) return '$0';
  if (m >= 1e6) {
    const cents = Math.round(m / 1e4);
    return `$${groupThousands(String(Math.floor(cents / 100)))}.${String(cents % 100).padStart(2, '0')}`;
  }
  return `$0.${String(m).padStart(6, '0').replace(/0+$/, '')}`;
}

export const count = (n) => groupThousands(String(Math.trunc(Number(n) || 0)));

export function when(at) {
  if (!at) return '';
  const date = new Date(at);
  if (Number.isNaN(date.getTime())) return String(at);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
    : date.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
}

/// A `datetime-local` value as RFC 3339 (UTC), or undefined when empty.
export function instant(value) {
  if (!value) return undefined;
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? undefined : date.toISOString();
}

/// A random id from [a-z0-9], made without crypto.randomUUID, which plain
/// http on a LAN address does not have.
export function randomId(length) {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  const bytes = crypto.getRandomValues(new Uint8Array(length));
  return Array.from(bytes, (b) => alphabet[b % alphabet.length]).join('');
}

// ---- notices ----

let noticeTimer = null;

/// Shows a message in the bar at the top; news (not errors) fades by itself.
export function notice(message, kind = 'error') {
  $('notice-text').textContent = message;
  $('notice').className = `notice ${kind}`;
  $('notice').hidden = false;
  clearTimeout(noticeTimer);
  if (kind === 'info') noticeTimer = setTimeout(clearNotice, 8000);
}

export function clearNotice() {
  $('notice').hidden = true;
}
