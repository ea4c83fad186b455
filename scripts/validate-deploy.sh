#!/usr/bin/env bash
# Validates the deployment files offline:
#   scripts/validate-deploy.sh [K8S_DIR]     (default deploy/k8s)
# * renders K8S_DIR/base and every K8S_DIR/overlays/* with `kubectl
#   kustomize` (without kubectl, or with KAIROS_KUBECTL naming one that is
#   not there: checks each directory's own files, not the rendered result,
#   says so, and skips the checks of what refers to what, which need the
#   render);
# * checks the core resources against the Kubernetes schemas bundled with
#   kubernetes-validate (strict: unknown fields fail), for Kubernetes
#   $KAIROS_K8S_VERSION (default 1.32.0);
# * checks the KEDA ScaledObjects and TriggerAuthentications against KEDA's
#   CRD schemas kept in deploy/k8s/schemas (see its README), and what they
#   refer to;
# * runs `docker-compose config` on docker-compose.yml with .env.example,
#   and checks the worker pools can be scaled.
# Python tools live in target/py (installed on first use; offline after).
# Exits non-zero on any problem. tests/tests/deploy_manifests.rs runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_DIR=${1:-deploy/k8s}
K8S_VERSION=${KAIROS_K8S_VERSION:-1.32.0}
KUBECTL=${KAIROS_KUBECTL:-kubectl}
SCHEMAS=deploy/k8s/schemas
PY=target/py/bin/python

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "[validate-deploy] $*" >&2; }

if ! "$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  say "installing kubernetes-validate, jsonschema and pyyaml into target/py"
  mkdir -p target
  [ -x "$PY" ] || python3 -m venv target/py
  # Pinned: the bundled Kubernetes schemas (1.25 to 1.37) come with the
  # package; the check runs offline once they are installed.
  target/py/bin/python -m pip install -q kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.4
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

dirs=("$K8S_DIR/base")
for d in "$K8S_DIR"/overlays/*/; do
  [ -f "$d/kustomization.yaml" ] && dirs+=("${d%/}")
done

rendered=()
refs=--refs
for d in "${dirs[@]}"; do
  name=$(basename "$d")
  if command -v "$KUBECTL" >/dev/null; then
    "$KUBECTL" kustomize "$d" >"$out/$name.yaml"
    say "rendered $d"
  else
    refs=--no-refs
    say "$KUBECTL not found: checking the files of $d as they are, not the rendered result"
    for f in "$d"/*.yaml; do
      [ "$(basename "$f")" = kustomization.yaml ] && continue
      cat "$f"
      echo "---"
    done >"$out/$name.yaml"
  fi
  rendered+=("$out/$name.yaml")
done

"$PY" "$SCHEMAS/validate.py" k8s "$refs" "$K8S_VERSION" "$SCHEMAS" "${rendered[@]}"
say "Kubernetes $K8S_VERSION and KEDA schemas: ${dirs[*]} valid"

if ! command -v docker-compose >/dev/null; then
  say "installing docker-compose"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
docker-compose --env-file .env.example -f docker-compose.yml config >"$out/compose.yaml"
"$PY" "$SCHEMAS/validate.py" compose "$out/compose.yaml"
say "docker-compose.yml valid with .env.example"
