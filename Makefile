# The two commands a new user needs:
#   make demo   set everything up, start the local cluster, operator and server, serve a request
#   make test   set everything up and run every test (unit and integration)
.PHONY: setup demo test unit integration lint fmt down manifests

VENV ?= .venv
# Never put the working directory on sys.path: ./operator would shadow the
# standard library's `operator` module.
export PYTHONSAFEPATH := 1
PY := $(VENV)/bin/python

setup:
	./hack/bootstrap.sh

demo: setup
	$(VENV)/bin/autoglm-dev demo

test: setup lint
	$(PY) -m pytest tests/unit tests/integration

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PY) -m pytest tests/integration

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	./hack/typecheck.sh

fmt:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

down:
	$(VENV)/bin/autoglm-dev cluster down

# Derived files: the chart's CRD copy and manifests/base/install.yaml;
# tests fail when they are stale.
manifests:
	./hack/render-manifests.sh
