# The few commands a person needs. `make test` works on a fresh machine: it builds the virtualenv,
# starts PostgreSQL/Redis if they are installed but down, checks style, types and generated code,
# then runs the whole test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test lint typecheck protos protos-check services fleet clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU wheel; anything else pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

services:
	tools/ensure_services.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy mlecs server edge_agent benchmarks

protos: setup
	PATH=$(VENV)/bin:$$PATH tools/gen_protos.sh

protos-check: setup
	PATH=$(VENV)/bin:$$PATH tools/check_protos.sh

test: setup services lint typecheck protos-check
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

fleet: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/mlecs fleet --clients 3 --rounds 3 --json out.json

clean:
	rm -rf $(VENV) mlecs-data .mypy_cache .ruff_cache .pytest_cache
