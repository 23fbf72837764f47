// The HTTP API, called with the pasted key; its errors as ApiError.

import { notice } from './dom.js';

/// What every view shares: the key in use and what it may do.
export const session = {
  key: null,
  // `GET /v1/usage` for the key: its id, name and scopes.
  usage: null,
  isAdmin: false,
  // The view shown now.
  view: null,
  // Bumped on every navigation so late answers for an old view are dropped.
  generation: 0,
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

export async function send(method, path, body, extraHeaders = {}) {
  const headers = authHeaders({ Accept: 'application/json', ...extraHeaders });
  const init = { method, headers, cache: 'no-store' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  try {
    return await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, 'network', `cannot reach the server (${error.message})`);
  }
}

/// The JSON body of a 2xx, or an ApiError carrying the server's message.
export async function readJson(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    let message = (error && error.message) || `${response.status} ${response.statusText}`;
    const retry = response.headers.get('Retry-After');
    if (response.status === 429 && retry) message += ` (retry in ${retry} s)`;
    throw new ApiError(response.status, (error && error.code) || `http_${response.status}`, message);
  }
  return body;
}

export async function api(method, path, body) {
  return readJson(await send(method, path, body));
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

/// Shows an API error; a refused key says so, since every view depends on it.
export function failed(error) {
  if (error instanceof ApiError && error.status === 401) {
    notice(`${error.message}. Use “forget key” to paste another.`);
  } else {
    notice(error.message || String(error));
  }
}
