// The chat view: the key's conversations, a thread, and replies streamed in
// as they are written (`POST …/messages` with `Accept: text/event-stream`).

import { $, h, when, randomId, notice } from './dom.js';
import { session, ApiError, api, send, readJson, query, failed } from './api.js';

const CONVERSATION_PAGE = 200;
// Messages a thread loads at a time.
const HISTORY_PAGE = 100;

const state = {
  // The open conversation; null for a new one not yet sent to.
  conversationId: null,
  conversations: new Map(),
  conversationsAfter: null,
  // Conversations with a reply streaming in now.
  streaming: new Set(),
};

export function showChat(arg) {
  const chat = $('view-chat');
  chat.classList.toggle('open', arg !== null);
  loadConversations(true);
  if (arg === null || arg === 'new') {
    state.conversationId = null;
    $('thread-title').textContent = 'New conversation';
    $('messages').replaceChildren();
    $('thread-erased').hidden = true;
  } else if (arg !== state.conversationId || !state.streaming.has(arg)) {
    // A thread with a reply streaming into it keeps its bubbles.
    openConversation(arg);
  }
  markCurrentConversation();
  if (arg !== null) $('composer-text').focus();
}

async function loadConversations(fresh) {
  if (fresh) {
    state.conversations.clear();
    state.conversationsAfter = null;
  }
  try {
    const page = await api('GET', `/v1/conversations${query({ limit: CONVERSATION_PAGE, after: state.conversationsAfter })}`);
    const rows = page.conversations || [];
    for (const row of rows) state.conversations.set(row.conversation_id, row);
    state.conversationsAfter = rows.length ? rows[rows.length - 1].conversation_id : state.conversationsAfter;
    $('conversation-more').hidden = rows.length < CONVERSATION_PAGE;
    renderConversations();
  } catch (error) {
    failed(error);
  }
}

function renderConversations() {
  const rows = [...state.conversations.values()].sort((a, b) => String(b.last_at).localeCompare(String(a.last_at)));
  $('conversation-list').replaceChildren(
    ...rows.map((row) =>
      h(
        'li',
        {},
        h(
          'a',
          { href: `#/chat/${encodeURIComponent(row.conversation_id)}`, 'data-id': row.conversation_id },
          h('span', { class: 'conv-id', text: row.conversation_id }),
          h('span', {
            class: 'conv-meta',
            text: `${row.messages} message${row.messages === 1 ? '' : 's'} · ${when(row.last_at)}${row.erased ? ' · erased' : ''}`,
          }),
        ),
      ),
    ),
  );
  $('conversation-empty').hidden = rows.length > 0;
  markCurrentConversation();
}

function markCurrentConversation() {
  for (const link of $('conversation-list').querySelectorAll('a')) {
    if (link.dataset.id === state.conversationId) link.setAttribute('aria-current', 'true');
    else link.removeAttribute('aria-current');
  }
}

async function openConversation(id) {
  state.conversationId = id;
  const generation = session.generation;
  $('thread-title').textContent = id;
  $('messages').replaceChildren(h('li', { class: 'hint', text: 'Loading…' }));
  $('thread-erased').hidden = true;
  try {
    // The newest messages; earlier ones a page at a time, on request.
    const history = await api('GET', historyPage(id, { latest: true }));
    if (generation !== session.generation) return;
    $('messages').replaceChildren(...earlierButton(id, history), ...bubbles(history));
    $('thread-erased').hidden = !history.erased;
    scrollToEnd();
  } catch (error) {
    if (generation !== session.generation) return;
    $('messages').replaceChildren();
    failed(error);
  }
}

function historyPage(id, params) {
  return `/v1/conversations/${encodeURIComponent(id)}${query({ limit: HISTORY_PAGE, ...params })}`;
}

function bubbles(history) {
  return (history.messages || []).map((m) => {
    const bubble = messageBubble(m.role, m.content);
    bubble.setMeta(m.role === 'assistant' ? m.agent || 'assistant' : 'you', m.at);
    return bubble.el;
  });
}

/// A button above a page read backwards that has more before it: it loads
/// the page before, keeping the thread where the reader is.
function earlierButton(id, history) {
  const first = (history.messages || [])[0];
  if (!history.has_more || !first) return [];
  const item = h('li', { class: 'earlier' });
  const button = h('button', {
    type: 'button',
    class: 'link',
    id: 'messages-earlier',
    text: 'Earlier messages',
    onclick: async () => {
      const generation = session.generation;
      button.disabled = true;
      try {
        const page = await api('GET', historyPage(id, { before_seq: first.seq }));
        if (generation !== session.generation || state.conversationId !== id) return;
        const list = $('messages');
        const fromBottom = list.scrollHeight - list.scrollTop;
        item.replaceWith(...earlierButton(id, page), ...bubbles(page));
        list.scrollTop = list.scrollHeight - fromBottom;
      } catch (error) {
        button.disabled = false;
        failed(error);
      }
    },
  });
  item.append(button);
  return [item];
}

/// One message in the thread, with what a streamed reply needs.
function messageBubble(role, content) {
  const text = h('div', { class: 'text', text: content || '' });
  const meta = h('div', { class: 'meta' });
  const el = h('li', { class: `msg ${role}` }, meta, text);
  return {
    el,
    text,
    setText(value) {
      text.textContent = value;
    },
    setMeta(who, at, extra) {
      meta.textContent = [who, when(at), extra].filter(Boolean).join(' · ');
    },
    setState(name) {
      el.classList.remove('pending', 'streaming', 'failed');
      if (name) el.classList.add(name);
    },
  };
}

function scrollToEnd() {
  const list = $('messages');
  list.scrollTop = list.scrollHeight;
  if (list.lastElementChild) list.lastElementChild.scrollIntoView({ block: 'nearest' });
}

/// Parses an SSE body into `{event, data, id}`, one at a time as they
/// arrive. (EventSource cannot send the Authorization header.)
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // A lone '\r' may be the first half of a '\r\n' still on its way.
      const ready = buffer.endsWith('\r') ? buffer.length - 1 : buffer.length;
      let text = buffer.slice(0, ready).replace(/\r\n?/g, '\n');
      buffer = buffer.slice(ready);
      let end;
      while ((end = text.indexOf('\n\n')) >= 0) {
        const event = parseEvent(text.slice(0, end));
        text = text.slice(end + 2);
        if (event) yield event;
      }
      buffer = text + buffer;
    }
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  let event = 'message';
  let id = null;
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id') id = value;
  }
  if (!data.length) return null;
  let parsed;
  try {
    parsed = JSON.parse(data.join('\n'));
  } catch {
    parsed = data.join('\n');
  }
  return { event, data: parsed, id };
}

async function sendMessage(content) {
  if (!state.conversationId) {
    state.conversationId = `web-${randomId(12)}`;
    history.replaceState(null, '', `#/chat/${state.conversationId}`);
    $('view-chat').classList.add('open');
    $('thread-title').textContent = state.conversationId;
  }
  const id = state.conversationId;
  const agent = $('composer-agent').value.trim();
  const body = { content, message_id: `web-${randomId(20)}` };
  if (agent) body.agent = agent;

  // The user may open another conversation meanwhile: its thread is not this one's.
  const show = (bubble) => {
    if (state.conversationId === id) {
      $('messages').append(bubble.el);
      scrollToEnd();
    }
  };
  const mine = messageBubble('user', content);
  mine.setMeta('you', new Date().toISOString(), 'sending…');
  mine.setState('pending');
  show(mine);
  state.streaming.add(id);

  let reply = null;
  let shown = '';
  let ended = false;
  try {
    const response = await send('POST', `/v1/conversations/${encodeURIComponent(id)}/messages`, body, {
      Accept: 'text/event-stream',
    });
    if (!response.ok || !(response.headers.get('Content-Type') || '').startsWith('text/event-stream')) {
      await readJson(response);
      throw new ApiError(response.status, 'protocol', 'the server did not stream the reply');
    }
    for await (const event of serverEvents(response)) {
      const data = event.data || {};
      if (event.event === 'ack') {
        mine.setState(null);
        mine.setMeta('you', new Date().toISOString(), data.duplicate ? 'already sent' : `#${data.seq}`);
        reply = messageBubble('assistant', '');
        reply.setMeta(agent || 'assistant', null, 'replying…');
        reply.setState('streaming');
        show(reply);
        if (!data.duplicate) loadConversations(true);
      } else if (event.event === 'reply_delta' && reply) {
        shown += data.delta || '';
        reply.setText(shown);
        scrollToEnd();
      } else if (event.event === 'reply_completed' && reply) {
        const done = data.data || {};
        reply.setText(done.content ?? shown);
        reply.setMeta(done.agent || 'assistant', data.at);
        reply.setState(null);
        ended = true;
      } else if (event.event === 'reply_failed' && reply) {
        // The deltas shown so far are not a reply: the failure replaces them.
        const failure = data.data || {};
        reply.setText(`The reply failed (${failure.code}): ${failure.message}`);
        reply.setMeta(failure.agent || 'assistant', data.at, 'failed');
        reply.setState('failed');
        ended = true;
      } else if (event.event === 'error') {
        notice(data.message || 'the stream ended with an error');
      }
      scrollToEnd();
    }
    if (reply && !ended) {
      reply.setMeta('assistant', null, 'the stream ended early; the reply will be in the history');
      reply.setState(null);
    }
  } catch (error) {
    mine.setState('failed');
    mine.setMeta('you', new Date().toISOString(), `not sent: ${error.message}`);
    if (reply) reply.setState(null);
    failed(error);
  } finally {
    state.streaming.delete(id);
  }
  loadConversations(true);
}

/// Hooks the chat view's controls up; once, at start.
export function wireChat() {
  $('new-conversation').addEventListener('click', () => {
    location.hash = '#/chat/new';
  });
  $('back-to-list').addEventListener('click', () => {
    location.hash = '#/chat';
  });
  $('conversation-more').addEventListener('click', () => loadConversations(false));
  const composer = $('composer-text');
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    const content = composer.value;
    if (!content.trim()) return;
    composer.value = '';
    sendMessage(content);
  });
  composer.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('composer').requestSubmit();
    }
  });
}

/// Forgets what the last key could see.
export function resetChat() {
  state.conversations.clear();
  state.conversationId = null;
  $('messages').replaceChildren();
  $('conversation-list').replaceChildren();
}
