# moefleet: `make run` serves a tiny MoE on CPU as a local disaggregated fleet (1 prefill + 1 decode group of
# 2 ranks each + the gateway, `moefleet local`); `make test` installs everything the tests need and runs them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CACHE := $(CURDIR)/.cache
TINY_MODEL := $(CACHE)/models/tiny-qwen3-moe
PORT ?= 8000
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test venv venv-run lint typecheck pytest cluster-bins cluster bench clean

# The venv is reused; the stamps record which dependency set was installed from which pyproject.toml.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.stamp-run: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.stamp-run

venv-run: $(VENV)/.stamp-run
venv: $(VENV)/.stamp-test

run: venv-run
	@test -f $(TINY_MODEL)/config.json || $(VENV)/bin/moefleet make-tiny-model --arch qwen3_moe --out $(TINY_MODEL)
	$(VENV)/bin/moefleet local -f manifests/local/tiny-pd.yaml --model $(TINY_MODEL) --port $(PORT) --device cpu

lint: venv
	$(VENV)/bin/ruff check engine operator src tests
	$(VENV)/bin/ruff format --check engine operator src tests

typecheck: venv
	$(VENV)/bin/mypy engine operator src

# Kubernetes test binaries (kube-apiserver, controller-manager, scheduler, kubectl, etcd, kwok, helm) built
# from pinned Go modules into ~/.cache/moefleet/bin (shared by clones; MOEFLEET_CACHE overrides), rebuilt only
# when the pins change; prometheus from apt. Pins and reasons: tests/support/binaries.py, docs/testing.md.
cluster-bins: venv
	$(PY) tests/support/binaries.py build

# A local control plane in the foreground; admin kubeconfig at .cache/cluster/kubeconfig. Ctrl-C stops it.
cluster: cluster-bins
	PYTHONPATH=tests $(PY) -m support.controlplane

# MOEFLEET_REQUIRE_ORACLES=1: a missing transformers fails the run instead of skipping the parity tests
# (tests/support/oracles.py; CI=1 does the same).
pytest: venv
	MOEFLEET_REQUIRE_ORACLES=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

test: venv cluster-bins lint typecheck pytest

bench: venv
	$(VENV)/bin/python benchmarks/throughput_cpu.py

clean:
	rm -rf $(VENV) $(CACHE)
