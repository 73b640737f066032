#!/usr/bin/env bash
# mypy --strict over the three packages under their import names. The folders are
# mapped by setuptools (operator/ -> autoglm_operator, ...), which mypy can't follow,
# and a folder named `operator` would shadow the standard library; so we point mypy
# at a folder of symlinks named like the packages.
set -euo pipefail
cd "$(dirname "$0")/.."
links=.cache/typecheck
mkdir -p "$links"
ln -sfn ../../operator "$links/autoglm_operator"
ln -sfn ../../server "$links/autoglm_server"
ln -sfn ../../dev "$links/autoglm_dev"
MYPYPATH="$links" exec "${VENV:-.venv}/bin/mypy" -p autoglm_operator -p autoglm_server -p autoglm_dev "$@"
