// Structural checks the types cannot express (node, no dependencies beyond
// @grafana/schema's own defaults). usage: node check.mjs DASHBOARD.json...
//
// - uid stable-looking and unique across the dashboards, tag "mesh-trace",
//   schemaVersion equal to @grafana/schema's defaultDashboard.schemaVersion;
// - panel ids: integers, unique within a dashboard (rows and their panels included);
// - gridPos on every panel, inside the 24 columns, no two panels overlapping;
// - every panel except rows: a unit, the ${datasource} data source, a non-empty
//   targets list; every target: a refId (unique in its panel) and a non-empty expr;
// - variables: `datasource` (type datasource, prometheus) and the query variables
//   namespace, workload, service (includeAll, allValue ".*", multi);
// - every $var / ${var} / [[var]] used in an expr, a variable query, a title or a
//   description is a defined variable or a Grafana built-in;
// - the contract the end-to-end test relies on when it substitutes variables:
//   $namespace/$workload/$service appear only as `=~"$var"`, and every range
//   selector is [$__rate_interval], [$__interval] or [$__range].
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { defaultDashboard } = require('@grafana/schema');

const files = process.argv.slice(2);
const BUILTINS = new Set([
  '__rate_interval',
  '__interval',
  '__interval_ms',
  '__range',
  '__range_s',
  '__range_ms',
  '__from',
  '__to',
  '__dashboard',
  '__org',
  '__user',
  '__name',
  '__timeFilter',
]);
const FILTER_VARS = ['namespace', 'workload', 'service'];
const WINDOWS = new Set(['$__rate_interval', '$__interval', '$__range']);

let errors = 0;
const uids = new Map();

function varsUsed(text) {
  const out = [];
  const re = /\$\{([A-Za-z0-9_]+)(?::[^}]*)?\}|\[\[([A-Za-z0-9_]+)(?::[^\]]*)?\]\]|\$([A-Za-z0-9_]+)/g;
  for (const m of String(text).matchAll(re)) out.push(m[1] ?? m[2] ?? m[3]);
  return out;
}

for (const file of files) {
  const problems = [];
  const fail = (msg) => problems.push(msg);
  let d;
  try {
    d = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    console.error(`FAIL ${file}: not valid JSON: ${e.message}`);
    errors++;
    continue;
  }

  if (typeof d.uid !== 'string' || !/^[A-Za-z0-9_-]{1,40}$/.test(d.uid)) fail(`uid ${JSON.stringify(d.uid)} is not 1-40 of [A-Za-z0-9_-]`);
  else if (uids.has(d.uid)) fail(`uid ${d.uid} is also used by ${uids.get(d.uid)}`);
  else uids.set(d.uid, file);
  if (!Array.isArray(d.tags) || !d.tags.includes('mesh-trace')) fail('tags must include "mesh-trace"');
  if (d.schemaVersion !== defaultDashboard.schemaVersion)
    fail(`schemaVersion ${d.schemaVersion}, @grafana/schema's current is ${defaultDashboard.schemaVersion}`);

  // Variables.
  const vars = new Map((d.templating?.list ?? []).map((v) => [v?.name, v]));
  const ds = vars.get('datasource');
  if (!ds || ds.type !== 'datasource' || ds.query !== 'prometheus') fail('variable "datasource" must be type datasource with query "prometheus"');
  for (const name of FILTER_VARS) {
    const v = vars.get(name);
    if (!v) {
      fail(`variable "${name}" missing`);
      continue;
    }
    if (v.type !== 'query') fail(`variable ${name}: type ${v.type}, want query`);
    if (v.includeAll !== true || v.allValue !== '.*' || v.multi !== true) fail(`variable ${name}: needs includeAll, allValue ".*", multi`);
    const q = typeof v.query === 'string' ? v.query : v.query?.query;
    if (!/^label_values\(/.test(q ?? '')) fail(`variable ${name}: query should be label_values(...), got ${JSON.stringify(q)}`);
  }
  const checkVars = (where, text) => {
    for (const name of varsUsed(text)) {
      if (!vars.has(name) && !BUILTINS.has(name)) fail(`${where}: uses undefined variable $${name}`);
    }
  };
  for (const v of vars.values()) {
    checkVars(`variable ${v.name}`, typeof v.query === 'string' ? v.query : JSON.stringify(v.query ?? ''));
  }

  // Panels, rows' nested panels included.
  const panels = [];
  for (const p of d.panels ?? []) {
    panels.push(p);
    if (p?.type === 'row') panels.push(...(p.panels ?? []));
  }
  const ids = new Map();
  const cells = new Map();
  let targets = 0;
  for (const p of panels) {
    const where = `panel ${p?.id} "${p?.title}"`;
    if (!Number.isInteger(p?.id)) fail(`${where}: id must be an integer`);
    else if (ids.has(p.id)) fail(`${where}: id ${p.id} also used by "${ids.get(p.id)}"`);
    else ids.set(p.id, p.title);
    const g = p?.gridPos;
    if (!g || ![g.x, g.y, g.w, g.h].every(Number.isInteger)) fail(`${where}: gridPos needs integer x, y, w, h`);
    else if (g.x < 0 || g.w < 1 || g.h < 1 || g.x + g.w > 24) fail(`${where}: gridPos outside the 24 columns`);
    else {
      let overlap;
      for (let y = g.y; y < g.y + g.h; y++)
        for (let x = g.x; x < g.x + g.w; x++) {
          const key = `${x},${y}`;
          if (cells.has(key) && overlap === undefined) overlap = `panel ${cells.get(key)} at x=${x} y=${y}`;
          cells.set(key, p.id);
        }
      if (overlap) fail(`${where}: overlaps ${overlap}`);
    }
    checkVars(where, `${p?.title ?? ''} ${p?.description ?? ''}`);
    if (p?.type === 'row') continue;
    if (!p?.fieldConfig?.defaults?.unit) fail(`${where}: fieldConfig.defaults.unit not set`);
    if (p?.datasource?.uid !== '${datasource}') fail(`${where}: datasource must be {uid: "\${datasource}"}`);
    if (!Array.isArray(p?.targets) || p.targets.length === 0) {
      fail(`${where}: no targets`);
      continue;
    }
    const refIds = new Set();
    for (const t of p.targets) {
      targets++;
      const tw = `${where} target ${t?.refId}`;
      if (typeof t?.refId !== 'string' || t.refId === '') fail(`${where}: a target has no refId`);
      else if (refIds.has(t.refId)) fail(`${tw}: refId repeated`);
      else refIds.add(t.refId);
      if (typeof t?.expr !== 'string' || t.expr.trim() === '') {
        fail(`${tw}: no expr`);
        continue;
      }
      if (t.datasource && t.datasource.uid !== '${datasource}') fail(`${tw}: datasource must be \${datasource}`);
      checkVars(tw, t.expr);
      if (t.legendFormat) checkVars(`${tw} legend`, t.legendFormat.replace(/\{\{[^}]*\}\}/g, ''));
      for (const name of FILTER_VARS) {
        const all = t.expr.split(`$${name}`).length - 1;
        const inMatcher = t.expr.split(`=~"$${name}"`).length - 1;
        if (all !== inMatcher) fail(`${tw}: $${name} used outside a =~"$${name}" matcher`);
      }
      for (const m of t.expr.matchAll(/\[([^\]]*)\]/g)) {
        const w = m[1].split(':')[0];
        if (!WINDOWS.has(w)) fail(`${tw}: range [${m[1]}] should be [$__rate_interval] or [$__range]`);
      }
    }
  }

  if (problems.length) {
    errors += problems.length;
    console.error(`FAIL ${file}`);
    for (const p of problems) console.error(`  - ${p}`);
  } else {
    console.log(
      `ok   ${file}: uid ${d.uid}, schemaVersion ${d.schemaVersion}, ${panels.length} panels, ${targets} queries, variables ${[...vars.keys()].join(', ')}`,
    );
  }
}
process.exit(errors ? 1 : 0);
