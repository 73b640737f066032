#!/usr/bin/env bash
# Installs everything the project needs, idempotently, and is quick when warm:
#   - a Python virtual environment in .venv with the project installed editable (all extras);
#   - the pinned control-plane binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
#     etcd, kubectl, kwok, helm) and the live cluster's add-ons (Prometheus, prometheus-adapter,
#     Traefik), built from Go modules into a cache outside the clone.
# Needs: Python >= 3.11 and Go >= 1.26.7 (Prometheus v0.316.0 asks for it) on PATH, and access to PyPI and the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

"$PYTHON" - <<'PY' || { echo "error: Python >= 3.11 is needed (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if ! command -v go >/dev/null 2>&1; then
  echo "error: Go >= 1.26.7 is needed to build the local control plane and its add-ons (https://go.dev/dl)" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the dependency declaration changed.
stamp="$VENV/.autoglm-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import autoglm_server, autoglm_operator, autoglm_dev' 2>/dev/null; then
  echo "==> installing Python packages (the first time downloads PyTorch, about 3 GB)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi

echo "==> control-plane and add-on binaries (cold: about 10 min of build for the control plane and"
echo "    about 33 CPU-minutes for Prometheus, prometheus-adapter and Traefik on 2 cores; cached afterwards)"
"$VENV/bin/autoglm-dev" cluster build
