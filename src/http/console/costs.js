// The costs view: the key's own usage, and for an admin key the spend per day
// and per model as SVG bar charts with their tables. Money arrives as integer
// micro-USD, summed and formatted as whole numbers (exact below 2^53).

import { $, h, s, usd, usdShort, count, when } from './dom.js';
import { session, api, query, failed } from './api.js';

const state = {
  // The last report, redrawn when the window's width changes.
  charts: null,
};

export async function showCosts() {
  const generation = session.generation;
  try {
    const usage = await api('GET', '/v1/usage');
    if (generation !== session.generation) return;
    session.usage = usage;
    renderUsage(usage);
  } catch (error) {
    failed(error);
  }
  if (session.isAdmin) loadCostReports(generation);
}

function stats(el, pairs) {
  el.replaceChildren(...pairs.flatMap(([label, value]) => [h('dt', { text: label }), h('dd', { text: value })]));
}

function renderUsage(usage) {
  const spent = usage.spent || {};
  const limits = usage.limits || {};
  const limit = (value, unit) => (value === null || value === undefined ? 'unlimited' : `${count(value)} ${unit}`);
  const budget = usage.budget ? `${usd(usage.budget.micros)} per ${usage.budget.period}` : 'none';
  stats($('usage'), [
    ['key', `${usage.name} (${usage.key_id})`],
    ['scopes', (usage.scopes || []).join(', ')],
    ['spent', usd(spent.cost_micros)],
    ['requests', count(spent.requests)],
    ['tokens', `${count(spent.tokens_in)} in · ${count(spent.tokens_out)} out`],
    ['rate limits', `${limit(limits.rpm, 'req/min')} · ${limit(limits.tpm, 'tokens/min')} · ${limit(limits.max_parallel, 'parallel')}`],
    ['budget', budget],
    ['expires', usage.expires_at ? when(usage.expires_at) : 'never'],
  ]);
}

async function loadCostReports(generation) {
  const since = $('costs-since').value || undefined;
  const until = $('costs-until').value || undefined;
  try {
    const [byDay, byModel] = await Promise.all([
      api('GET', `/admin/costs${query({ by: 'day', since, until })}`),
      api('GET', `/admin/costs${query({ by: 'model', since, until })}`),
    ]);
    if (generation !== session.generation) return;
    const days = fillDays(byDay.rows || []);
    const models = [...(byModel.rows || [])].sort((a, b) => b.cost_micros - a.cost_micros || b.requests - a.requests);
    const total = models.reduce(
      (sum, row) => ({
        cost: sum.cost + row.cost_micros,
        requests: sum.requests + row.requests,
        tokensIn: sum.tokensIn + row.tokens_in,
        tokensOut: sum.tokensOut + row.tokens_out,
      }),
      { cost: 0, requests: 0, tokensIn: 0, tokensOut: 0 },
    );
    stats($('costs-totals'), [
      ['total spend', usd(total.cost)],
      ['requests', count(total.requests)],
      ['tokens in', count(total.tokensIn)],
      ['tokens out', count(total.tokensOut)],
    ]);
    state.charts = { days, models };
    drawCharts();
    costTable($('table-day'), days, 'day');
    costTable($('table-model'), models, 'model');
  } catch (error) {
    failed(error);
  }
}

export function drawCharts() {
  if (!state.charts || session.view !== 'costs') return;
  barChart($('chart-day'), state.charts.days, 'Spend per day');
  barChart($('chart-model'), state.charts.models, 'Spend per model');
}

/// Day rows with the empty days between them, so the chart's x axis is time.
function fillDays(rows) {
  const sorted = [...rows].sort((a, b) => String(a.group).localeCompare(String(b.group)));
  if (sorted.length < 2) return sorted;
  const byDay = new Map(sorted.map((row) => [row.group, row]));
  const first = Date.parse(`${sorted[0].group}T00:00:00Z`);
  const last = Date.parse(`${sorted[sorted.length - 1].group}T00:00:00Z`);
  if (Number.isNaN(first) || Number.isNaN(last) || (last - first) / 864e5 > 366) return sorted;
  const filled = [];
  for (let t = first; t <= last; t += 864e5) {
    const day = new Date(t).toISOString().slice(0, 10);
    filled.push(byDay.get(day) || { group: day, requests: 0, tokens_in: 0, tokens_out: 0, cost_micros: 0 });
  }
  return filled;
}

/// A "nice" axis step (1, 2 or 5 times a power of ten) in micro-USD.
function niceStep(max, ticks) {
  const raw = Math.max(1, max / ticks);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * power).find((candidate) => candidate >= raw);
  return Math.max(1, Math.round(step));
}

function barChart(container, rows, title) {
  if (!rows.length) {
    container.replaceChildren(h('p', { class: 'hint', text: 'No usage recorded in this period.' }));
    return;
  }
  // Drawn at the box's own width, so the labels keep their size on a phone.
  const width = Math.max(280, Math.round(container.clientWidth) || 600);
  const height = 240;
  const left = 72;
  const bottom = 44;
  const top = 12;
  const right = 8;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const max = Math.max(...rows.map((row) => row.cost_micros));
  const step = niceStep(max, 4);
  const ceiling = Math.max(step, Math.ceil(max / step) * step);
  const y = (micros) => top + plotH - (micros / ceiling) * plotH;

  const svg = s('svg', {
    viewBox: `0 0 ${width} ${height}`,
    class: 'bars',
    role: 'img',
    'aria-label': `${title}: ${rows.map((r) => `${r.group} ${usd(r.cost_micros)}`).join(', ')}`,
  });
  for (let tick = 0; tick <= ceiling; tick += step) {
    svg.append(
      s('line', { class: 'grid', x1: left, x2: width - right, y1: y(tick), y2: y(tick) }),
      s('text', { class: 'axis', x: left - 6, y: y(tick) + 4, 'text-anchor': 'end', text: usdShort(tick) }),
    );
  }
  const slot = plotW / rows.length;
  const barW = Math.max(2, Math.min(48, slot * 0.7));
  const labelEvery = Math.ceil(rows.length / Math.max(2, Math.floor(plotW / 80)));
  rows.forEach((row, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    // A sliver for any spend at all, so a tiny cost is not invisible.
    const barH = row.cost_micros > 0 ? Math.max(1.5, top + plotH - y(row.cost_micros)) : 0;
    const bar = s(
      'rect',
      { class: 'bar', x, y: top + plotH - barH, width: barW, height: barH, 'data-group': row.group },
      s('title', { text: `${row.group}: ${usd(row.cost_micros)} · ${count(row.requests)} requests · ${count(row.tokens_in)}+${count(row.tokens_out)} tokens` }),
    );
    svg.append(bar);
    if (i % labelEvery === 0) {
      const label = String(row.group);
      svg.append(
        s('text', {
          class: 'axis',
          x: left + i * slot + slot / 2,
          y: height - bottom + 16,
          'text-anchor': 'middle',
          text: label.length > 12 ? `${label.slice(0, 11)}…` : label,
        }),
      );
    }
  });
  svg.append(s('line', { class: 'baseline', x1: left, x2: width - right, y1: top + plotH, y2: top + plotH }));
  container.replaceChildren(svg);
}

function costTable(table, rows, what) {
  const head = h('tr', {}, ...[what, 'requests', 'tokens in', 'tokens out', 'spend'].map((t) => h('th', { scope: 'col', text: t })));
  const body = rows
    .filter((row) => row.requests > 0)
    .map((row) =>
      h(
        'tr',
        {},
        h('th', { scope: 'row', text: row.group || '(none)' }),
        h('td', { class: 'num', text: count(row.requests) }),
        h('td', { class: 'num', text: count(row.tokens_in) }),
        h('td', { class: 'num', text: count(row.tokens_out) }),
        h('td', { class: 'num', text: usd(row.cost_micros) }),
      ),
    );
  table.replaceChildren(h('thead', {}, head), h('tbody', {}, ...body));
}

/// Hooks the costs view's controls up; once, at start.
export function wireCosts() {
  $('costs-form').addEventListener('submit', (event) => {
    event.preventDefault();
    loadCostReports(session.generation);
  });
  let resizing = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizing);
    resizing = setTimeout(drawCharts, 150);
  });
}

/// Forgets what the last key could see.
export function resetCosts() {
  state.charts = null;
  for (const id of ['usage', 'costs-totals', 'chart-day', 'chart-model', 'table-day', 'table-model']) $(id).replaceChildren();
}
