// The costs view: the key's own usage and budgets, and for an admin key the
// spend per day and per model as SVG bar charts with their tables. Money
// arrives as integer micro-USD, summed and formatted as whole numbers (exact
// below 2^53).

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
  const budget = usage.budget ? `${dollars(usage.budget.micros)} ${PERIODS[usage.budget.period] || usage.budget.period}` : 'none';
  const left = rateLimitLeft(usage.rate_limit, limits);
  stats($('usage'), [
    ['key', `${usage.name} (${usage.key_id})`],
    ['scopes', (usage.scopes || []).join(', ')],
    ['spent', usd(spent.cost_micros)],
    ['requests', count(spent.requests)],
    ['tokens', `${count(spent.tokens_in)} in · ${count(spent.tokens_out)} out`],
    ['rate limits', `${limit(limits.rpm, 'req/min')} · ${limit(limits.tpm, 'tokens/min')} · ${limit(limits.max_parallel, 'parallel')}`],
    ...(left ? [['left now', left]] : []),
    ['budget', budget],
    ['expires', usage.expires_at ? when(usage.expires_at) : 'never'],
  ]);
  renderBudgets(usage);
}

const PERIODS = { day: 'per day', month: 'per month', total: 'in total' };

/// Integer micro-USD as dollars with two to six decimals ("$1.00",
/// "$0.000125"): exact, with no trailing zeros past the cents.
function dollars(micros) {
  return usd(micros).replace(/(\.\d\d\d*?)0+$/, '$1');
}

/// What is left of the key's per-minute limits, or null when none is set.
function rateLimitLeft(rateLimit, limits) {
  if (!rateLimit) return null;
  const parts = [];
  const part = (remaining, of, unit) => {
    if (remaining === null || remaining === undefined) return;
    parts.push(of ? `${count(remaining)} of ${count(of)} ${unit}` : `${count(remaining)} ${unit}`);
  };
  part(rateLimit.remaining_requests, limits.rpm, 'requests');
  part(rateLimit.remaining_tokens, limits.tpm, 'tokens');
  if (!parts.length) return null;
  const reset = Number(rateLimit.reset_ms) || 0;
  if (reset > 0) parts.push(`full again in ${(Math.ceil(reset / 100) / 10).toFixed(1)} s`);
  return parts.join(' · ');
}

/// One card per budget of the key and of its owner: spent of budget, what is
/// left, and a bar of the spent share (full, and marked, once it is spent).
function renderBudgets(usage) {
  const budgets = usage.budgets || [];
  const list = $('budgets');
  $('budgets-none').hidden = budgets.length > 0;
  list.replaceChildren(
    ...budgets.map((b) => {
      const budget = Number(b.budget_micros) || 0;
      const spent = Number(b.spent_micros) || 0;
      const remaining = Number(b.remaining_micros) || 0;
      const exhausted = remaining === 0;
      // Of 100, for the bar, with a sliver for any spend at all; the text
      // rounds down, so it says "100 %" only when it is.
      const share = budget > 0 ? Math.min(100, (spent / budget) * 100) : 100;
      const width = share > 0 && share < 1 ? 1 : share;
      const percent = budget > 0 ? Math.min(100, Math.floor((spent * 100) / budget)) : 100;
      const spentText = percent === 0 && spent > 0 ? '< 1 % spent' : `${percent} % spent`;
      const whose = b.scope === 'user' ? `user ${b.subject_id}` : b.subject_id === usage.key_id ? 'this key' : `key ${b.subject_id}`;
      const since = b.period === 'day' || b.period === 'month' ? `${b.period} from ${String(b.period_start).slice(0, 10)} (UTC)` : null;
      return h(
        'li',
        { class: `budget${exhausted ? ' exhausted' : ''}`, 'data-scope': b.scope, 'data-subject': b.subject_id },
        h(
          'div',
          { class: 'budget-head' },
          h('span', { class: 'budget-whose', text: whose }),
          h('span', { class: 'budget-period', text: PERIODS[b.period] || b.period }),
        ),
        h('div', { class: 'budget-figures', text: `${dollars(spent)} of ${dollars(budget)} spent · ${dollars(remaining)} left` }),
        h(
          'div',
          {
            class: 'budget-bar',
            role: 'meter',
            'aria-label': `budget of ${whose}`,
            'aria-valuemin': 0,
            'aria-valuemax': 100,
            'aria-valuenow': percent,
            'aria-valuetext': spentText,
          },
          // An SVG attribute sets the width: the CSP refuses inline styles.
          s(
            'svg',
            { viewBox: '0 0 100 1', preserveAspectRatio: 'none', 'aria-hidden': 'true', focusable: 'false' },
            s('rect', { class: 'budget-fill', x: 0, y: 0, width, height: 1 }),
          ),
        ),
        h('div', {
          class: 'budget-note',
          text: [
            spentText,
            since,
            exhausted ? (b.period === 'total' ? 'sends are refused' : 'sends are refused until the period rolls over') : null,
          ]
            .filter(Boolean)
            .join(' · '),
        }),
      );
    }),
  );
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
  $('budgets-none').hidden = true;
  for (const id of ['usage', 'budgets', 'costs-totals', 'chart-day', 'chart-model', 'table-day', 'table-model']) $(id).replaceChildren();
}
