# Two-tower recall pipeline. `make run` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# faiss-gpu where an NVIDIA GPU answers, faiss-cpu elsewhere; never both (the other is removed).
FAISS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),cpu,gpu)
STAMP := $(VENV)/.installed-$(FAISS)
export PYTHONUNBUFFERED := 1

.PHONY: venv browser run test test-faults load-test status recall quality bench backfill airflow infra-up infra-down serve clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	-$(BIN)/pip uninstall -q -y faiss-$(OTHER_FAISS) 2>/dev/null
	$(BIN)/pip install -q -e '.[$(FAISS),airflow,serve,bench,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

## Main job on embedded defaults: ingest (MovieLens-100K, or DATA=file, or synthetic), nightly retrain, publish, status.
run: venv infra-up
	$(BIN)/python -m twotower.cli run $(if $(DATA),--data "$(DATA)") $(if $(DATE),--date $(DATE))

test: venv infra-up browser
	$(BIN)/python -m pytest -q --ignore=tests/faults $(PYTEST_ARGS)

## Fault-injection suite (issue 7): kills, Redis restarts, broker outages, nightly crashes, bad input.
test-faults: venv infra-up
	$(BIN)/python -m pytest -q tests/faults $(PYTEST_ARGS)

## Debian's headless Chromium for the dashboard browser test (installed once, with apt-get).
browser:
	@bash infra/install_chromium.sh

status: venv
	@$(BIN)/python -m twotower.cli status

## make recall USER=196 K=10
recall: venv
	@$(BIN)/python -m twotower.cli recall --user "$(USER_ID)$(USER)" --k $(or $(K),10)

## Quality on MovieLens-100K under the DESIGN §9 protocol (full data, last interaction held out).
quality: venv
	$(BIN)/python -m twotower.cli quality

bench: venv infra-up
	$(BIN)/python -m benchmarks.run $(if $(ONLY),--only $(ONLY))

## Sustained load (issue 7): RATE events/s for MINUTES into the continuous consumer, memory and accounting checked.
load-test: venv infra-up
	$(BIN)/python -m benchmarks.load_test --rate $(or $(RATE),5000) --minutes $(or $(MINUTES),10)

backfill: venv infra-up
	$(BIN)/python -m twotower.cli backfill $(if $(DATE),--date $(DATE)) $(if $(START),--start $(START)) $(if $(END),--end $(END)) $(if $(PUBLISH),--publish $(PUBLISH))

airflow: venv
	$(BIN)/python -m twotower.cli airflow

serve: venv
	$(BIN)/python -m twotower.cli serve

infra-up: venv
	@$(BIN)/python -m infra.local up

infra-down: venv
	@$(BIN)/python -m infra.local down

clean:
	rm -rf state
