# Runwarden. The README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv testenv test unit lint demo demo-down bench soak deploy clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

testenv:
	hack/testenv build
	hack/testenv build-tools

lint: venv
	$(BIN)/lint-imports
	$(BIN)/ruff check controller cloudrun_emulator tests bench
	$(BIN)/ruff format --check controller cloudrun_emulator tests bench
	$(BIN)/mypy --strict controller

unit: venv
	$(BIN)/pytest tests/unit -q

test: venv testenv lint
	$(BIN)/pytest -q

demo: venv testenv
	hack/demo

demo-down:
	hack/demo down

bench: venv testenv
	$(BIN)/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(BIN)/python -m bench

soak: venv testenv
	RUNWARDEN_SOAK=1 $(BIN)/pytest -q tests/reliability

deploy:
	kubectl apply -k manifests/

clean:
	rm -rf $(VENV) .cache
