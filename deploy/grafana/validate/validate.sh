#!/usr/bin/env bash
# Validates the mesh-trace Grafana dashboards.
#
#   deploy/grafana/validate/validate.sh              # every deploy/grafana/*.json
#   deploy/grafana/validate/validate.sh FILE.json... # just these
#
# 1. Schema: @grafana/schema (pinned in package.json / package-lock.json) ships the
#    dashboard model as TypeScript types only, no JSON schema and no CUE. gen-ts.mjs
#    writes each dashboard as TypeScript (generated/<name>.ts) where every panel is
#    an object literal that must `satisfies` the types for its panel type and the
#    dashboard `Dashboard` (see schema.ts); `tsc --noEmit` then rejects unknown fields,
#    wrong types and values outside an enum.
# 2. Structure (check.mjs): unique panel ids, gridPos, units, every target has an expr,
#    every variable used is defined, schemaVersion is @grafana/schema's current one.
#
# Needs node and npm; installs only into deploy/grafana/validate/node_modules
# (`npm ci` from the committed lock file, skipped when it is up to date).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [ "$#" -gt 0 ]; then
  files=()
  for f in "$@"; do files+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"); done
else
  shopt -s nullglob
  files=("$(cd "$here/.." && pwd)"/*.json)
  shopt -u nullglob
  if [ "${#files[@]}" -eq 0 ]; then
    echo "validate.sh: no dashboards in $(cd "$here/.." && pwd)" >&2
    exit 1
  fi
fi

cd "$here"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "== npm ci (deploy/grafana/validate/node_modules)"
  npm ci --no-audit --no-fund --loglevel=error
fi

schema_version="$(node -p "require('./node_modules/@grafana/schema/package.json').version")"
tsc_version="$(node -p "require('./node_modules/typescript/package.json').version")"

echo "== schema: @grafana/schema $schema_version dashboard types, tsc $tsc_version --noEmit"
rm -rf generated
node gen-ts.mjs generated "${files[@]}"
status=0
if ./node_modules/.bin/tsc -p tsconfig.json; then
  for f in "${files[@]}"; do echo "ok   $f: matches Dashboard and its panels' plugin types"; done
else
  echo "FAIL schema: the errors above point into deploy/grafana/validate/generated/<name>.ts," >&2
  echo "     a copy of <name>.json with each panel checked on its own (comments give panel ids)" >&2
  status=1
fi

echo "== structure: ids, gridPos, units, targets, variables"
node check.mjs "${files[@]}" || status=1

if [ "$status" -eq 0 ]; then
  echo "== all ${#files[@]} dashboard(s) valid"
else
  echo "== INVALID" >&2
fi
exit "$status"
