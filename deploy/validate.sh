#!/usr/bin/env bash
# Renders every kustomization under deploy/ and validates the raw manifests and
# every rendered output against the Kubernetes API schemas (strict: unknown
# fields fail), and the Prometheus operator's ServiceMonitor/PodMonitor
# against deploy/schemas/. Exits non-zero on any failure.
#
# Tools it needs (it installs nothing; each is checked first):
#   kubectl              `kubectl kustomize`, any kubectl >= 1.20 (kustomize v2
#                        to v5). Debian 12: apt-get install kubernetes-client
#   kubernetes-validate  PyPI kubernetes-validate: the API's JSON schemas for
#                        recent Kubernetes versions
#   check-jsonschema     PyPI check-jsonschema: ServiceMonitor and PodMonitor,
#                        which kubernetes-validate has no schema for (it only
#                        warns and passes them)
#   python3 with PyYAML  splits YAML streams (PyYAML comes with
#                        kubernetes-validate)
#
# Environment:
#   KUBECTL        kubectl to use (default: kubectl)
#   KUBE_VERSIONS  Kubernetes versions to validate against, space-separated
#                  (default: the two newest minor versions kubernetes-validate
#                  ships schemas for)
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kubectl=${KUBECTL:-kubectl}

missing=()
command -v "$kubectl" >/dev/null 2>&1 ||
    missing+=("kubectl ('$kubectl'; Debian 12: apt-get install kubernetes-client)")
command -v kubernetes-validate >/dev/null 2>&1 ||
    missing+=("kubernetes-validate (pip install kubernetes-validate)")
command -v check-jsonschema >/dev/null 2>&1 ||
    missing+=("check-jsonschema (pip install check-jsonschema)")
if ! command -v python3 >/dev/null 2>&1; then
    missing+=("python3")
elif ! python3 -c 'import yaml' 2>/dev/null; then
    missing+=("PyYAML for python3 (pip install pyyaml)")
fi
if ((${#missing[@]})); then
    echo "validate.sh: missing tools, nothing was validated:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi

# The newest Kubernetes version kubernetes-validate knows is its default
# ("Defaults to 1.37.0" in --help); the one before is the previous minor.
if [[ -z ${KUBE_VERSIONS:-} ]]; then
    latest=$(kubernetes-validate --help | tr -s ' \n' ' ' |
        sed -n 's/.*Defaults to \([0-9]*\.[0-9]*\)\..*/\1/p')
    if [[ ! $latest =~ ^1\.[0-9]+$ ]]; then
        echo "validate.sh: cannot tell which Kubernetes versions kubernetes-validate knows; set KUBE_VERSIONS" >&2
        exit 2
    fi
    KUBE_VERSIONS="1.$((${latest#1.} - 1)) $latest"
fi
read -r -a versions <<<"$KUBE_VERSIONS"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rendered" "$work/docs"
failures=0
k8s_docs=()
fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

echo "== tools"
echo "kubectl: $("$kubectl" version --client 2>/dev/null | head -n 2 | tr '\n' ' ')"
echo "kubernetes-validate $(kubernetes-validate --version), Kubernetes ${versions[*]}"
echo "check-jsonschema $(check-jsonschema --version 2>&1 | awk '{print $NF}')"

# 1. Render every kustomization (base, components, overlays, dashboards).
echo "== render (kubectl kustomize)"
mapfile -t kustomizations < <(cd "$deploy" && find . -name node_modules -prune -o -name kustomization.yaml -printf '%h\n' | sed 's|^\./||' | sort)
for dir in "${kustomizations[@]}"; do
    out="$work/rendered/$dir.yaml"
    mkdir -p "$(dirname "$out")"
    if "$kubectl" kustomize "$deploy/$dir" >"$out" 2>"$work/stderr"; then
        echo "ok   $dir: $(grep -c '^kind:' "$out") objects"
        # kustomize v5 warns about bases/patchesStrategicMerge/patchesJson6902,
        # kept on purpose for kustomize v2 (see deploy/README.md).
        grep -v "^# Warning: '\(bases\|patchesStrategicMerge\|patchesJson6902\)' is deprecated" "$work/stderr" | sed 's/^/     /' || true
    else
        fail "$dir: kubectl kustomize failed:"
        sed 's/^/     /' "$work/stderr"
    fi
done

# 2. Split raw manifests and rendered outputs into one file per object, by
#    validator; check what a schema cannot (dashboards are valid JSON, the
#    dashboards ConfigMap fits in an object).
mapfile -t raw < <(cd "$deploy" && find kustomize -name '*.yaml' ! -name kustomization.yaml ! -name '*.patch.yaml' | sort)
echo "== split ${#raw[@]} raw manifests and ${#kustomizations[@]} rendered outputs"
if ! python3 - "$deploy" "$work" "${raw[@]}" <<'PY'; then
import json, os, sys
import yaml

deploy, work, raw = sys.argv[1], sys.argv[2], sys.argv[3:]
sources = [("raw/" + f[len("kustomize/"):-len(".yaml")], os.path.join(deploy, f)) for f in raw]
rendered = os.path.join(work, "rendered")
for top, _, files in sorted(os.walk(rendered)):
    for f in sorted(files):
        path = os.path.join(top, f)
        sources.append(("rendered/" + os.path.relpath(path, rendered)[:-len(".yaml")], path))
errors = 0
for label, path in sources:
    try:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
    except yaml.YAMLError as e:
        print(f"FAIL {label}: not YAML: {e}")
        errors += 1
        continue
    if not docs:
        print(f"FAIL {label}: no objects")
        errors += 1
    for i, d in enumerate(docs):
        try:
            kind, api, name = d["kind"], d["apiVersion"], d["metadata"]["name"]
        except (TypeError, KeyError):
            print(f"FAIL {label} #{i}: not a Kubernetes object (apiVersion, kind, metadata.name)")
            errors += 1
            continue
        group = api.split("/")[0] if "/" in api else ""
        if group == "monitoring.coreos.com":
            target = kind.lower()
        elif group == "" or group.endswith(".k8s.io") or "." not in group:
            target = "k8s"
        else:
            print(f"FAIL {label}: {api} {kind}: no schema for this API group")
            errors += 1
            continue
        out = os.path.join(work, "docs", target, label, f"{i:02d}-{kind.lower()}-{name}.yaml")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            yaml.safe_dump(d, f, sort_keys=False)
        # Dashboards: every value must be JSON, and the ConfigMap must stay
        # under the 256 KiB that client-side `kubectl apply` can store in its
        # last-applied annotation (1 MiB is the hard limit of any object).
        labels = (d.get("metadata") or {}).get("labels") or {}
        if kind == "ConfigMap" and labels.get("grafana_dashboard") == "1":
            size = 0
            for key, value in (d.get("data") or {}).items():
                size += len(value.encode())
                try:
                    dash = json.loads(value)
                except ValueError as e:
                    print(f"FAIL {label}: dashboard {key} is not JSON: {e}")
                    errors += 1
                    continue
                if not isinstance(dash, dict) or "title" not in dash:
                    print(f"FAIL {label}: dashboard {key} has no title")
                    errors += 1
            if size > 256 * 1024:
                print(f"FAIL {label}: ConfigMap {name} holds {size} bytes of dashboards: "
                      "over 256 KiB, client-side kubectl apply fails (use --server-side and relax this check)")
                errors += 1
            else:
                print(f"ok   {label}: ConfigMap {name}: {len(d.get('data') or {})} dashboards, "
                      f"{size} bytes, valid JSON")
sys.exit(1 if errors else 0)
PY
    fail "splitting or checking the manifests (above)"
fi

# 3. Kubernetes objects: kubernetes-validate --strict against each version.
#    It prints WARN and still exits 0 for a kind it has no schema for: that
#    counts as a failure here.
echo "== kubernetes-validate --strict (Kubernetes ${versions[*]})"
if [[ -d $work/docs/k8s ]]; then
    mapfile -t k8s_docs < <(cd "$work/docs/k8s" && find . -type f -name '*.yaml' | sed 's|^\./||' | sort)
    kv_args=(--strict)
    for v in "${versions[@]}"; do kv_args+=(-k "$v"); done
    set +e
    (cd "$work/docs/k8s" && kubernetes-validate "${kv_args[@]}" "${k8s_docs[@]}") >"$work/kv.out" 2>&1
    kv_rc=$?
    set -e
    cat "$work/kv.out"
    if ((kv_rc != 0)) || grep -qv '^INFO .* passed for resource ' "$work/kv.out"; then
        fail "kubernetes-validate (exit $kv_rc; every line above that is not INFO ... passed)"
    fi
    expected=$((${#k8s_docs[@]} * ${#versions[@]}))
    passed=$(grep -c '^INFO .* passed for resource ' "$work/kv.out" || true)
    if ((passed != expected)); then
        fail "kubernetes-validate: $passed of $expected validations passed"
    fi
else
    fail "no Kubernetes objects found"
fi

# 4. monitoring.coreos.com objects (ServiceMonitor, PodMonitor, ...):
#    check-jsonschema against deploy/schemas/<kind>-monitoring-v1.json. A kind
#    without a schema there fails.
echo "== check-jsonschema (monitoring.coreos.com/v1)"
monitoring=0
for kind in servicemonitor podmonitor; do
    [[ -d $work/docs/$kind ]] || fail "no $kind found (expected in the components)"
done
for dir in "$work"/docs/*/; do
    kind=$(basename "$dir")
    [[ $kind == k8s ]] && continue
    schema="$deploy/schemas/$kind-monitoring-v1.json"
    if [[ ! -f $schema ]]; then
        fail "$kind: no schema deploy/schemas/${schema##*/}"
        continue
    fi
    mapfile -t docs < <(cd "$dir" && find . -type f -name '*.yaml' | sed 's|^\./||' | sort)
    for doc in "${docs[@]}"; do
        monitoring=$((monitoring + 1))
        if (cd "$dir" && check-jsonschema --color never --schemafile "$schema" "$doc") >"$work/cj.out" 2>&1; then
            echo "ok   $doc against schemas/${schema##*/}"
        else
            fail "$doc against schemas/${schema##*/}:"
            sed 's/^/     /' "$work/cj.out"
        fi
    done
done

echo "== summary"
echo "${#kustomizations[@]} kustomizations rendered with $kubectl; ${#raw[@]} raw manifests;" \
    "${#k8s_docs[@]} Kubernetes objects x Kubernetes ${versions[*]} (strict); $monitoring monitoring.coreos.com objects"
if ((failures)); then
    echo "$failures failure(s)"
    exit 1
fi
echo "all valid"
