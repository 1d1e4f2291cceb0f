# NexusCore: two commands do all the set-up on a fresh machine.
#   make demo   installs everything, starts a local Kafka broker, runs the pipeline on 1,000 requests
#   make test   installs everything and runs the whole suite (lint, types, unit, component, integration)

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REQUESTS ?= 1000
PACKAGES := kernel ledger schemas policy core observe transport streams providers projections replay services client gateway

.PHONY: install jars demo test unit lint linktree typecheck pytest fault fuzz bench bench-evidence bench-gateway schemas clean compose-keys

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's declared dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The Kafka broker's jars, fetched once from Maven Central with kafka/pom.xml (cached in .kafka/libs).
jars: install
	$(BIN)/python -c "from nexuscore._broker import ensure_kafka_jars; print('kafka jars:', ensure_kafka_jars())"

demo: jars
	$(BIN)/nexuscore demo --requests $(REQUESTS)

test: jars lint typecheck pytest

lint: install linktree
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd build/typecheck && PYTHONPATH=. ../../$(BIN)/lint-imports ../../pyproject.toml --no-cache
	# No function over 80 lines in product code or benchmarks (the house rule; a screen's worth).
	$(BIN)/python -m bench.function_lengths --max 80 --top 0 $(PACKAGES) nexuscore bench

# The packages live in root folders mapped under `nexuscore`; mypy reads them through a link tree
# that has the installed shape.
linktree:
	rm -rf build/typecheck && mkdir -p build/typecheck/nexuscore
	for f in nexuscore/*.py nexuscore/py.typed nexuscore/cli; do ln -s "$(CURDIR)/$$f" build/typecheck/nexuscore/; done
	for d in $(PACKAGES); do ln -s "$(CURDIR)/$$d" build/typecheck/nexuscore/$$d; done

typecheck: install linktree
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p nexuscore

pytest: install
	$(BIN)/python -m pytest --durations=5

# The unit tier alone (no broker, no faust app): the quick loop while editing.
unit: install
	$(BIN)/python -m pytest tests/unit -q

# The fault-injection suite (slow, outside `make test`): FAULT_REQUESTS requests while every process
# type is killed with SIGKILL, the broker restarted and the provider failing; figures in bench/results/fault.*.
FAULT_REQUESTS ?= 20000
fault: jars
	FAULT_REQUESTS=$(FAULT_REQUESTS) $(BIN)/python -m pytest -m slow tests/fault/test_fault_injection.py -s

# The fuzz run (slow, outside `make test`): FUZZ_MESSAGES hostile messages on every input topic,
# interleaved with FUZZ_REQUESTS valid requests on a live pipeline, each accounted for from the
# evidence; figures in bench/results/fuzz.* (FUZZ_MESSAGES=1000 FUZZ_REQUESTS=300 make fuzz: a short run).
FUZZ_MESSAGES ?= 10000
FUZZ_REQUESTS ?= 2000
fuzz: jars
	FUZZ_MESSAGES=$(FUZZ_MESSAGES) FUZZ_REQUESTS=$(FUZZ_REQUESTS) $(BIN)/python -m pytest -m slow tests/fault/test_fuzz.py -s

bench: jars
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.pipeline

# The evidence plane at scale: projector throughput on Kafka, then a store of 10,000,000 decisions
# (under /tmp/nexus-bench-evidence; DECISIONS=200000 for a quick run), its queries and verify.
DECISIONS ?= 10000000
bench-evidence: install
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.evidence --decisions $(DECISIONS)

# The front door: the same load through the HTTP gateway and straight to Kafka with the SDK, one run
# (GATEWAY_REQUESTS per phase, three phases; figures in bench/results/gateway.*).
GATEWAY_REQUESTS ?= 400
bench-gateway: jars
	$(BIN)/python -m bench.gateway --requests $(GATEWAY_REQUESTS)

# Demo keys, trust store and signed policy for compose.yaml (mounted as /keys; a deployer gives
# their own folder with NEXUSCORE_KEYS=DIR docker compose up), with one gateway API key for
# acme-bank (its secret printed once; more with `nexuscore gateway key add --keys DIR/gateway-keys.json`).
COMPOSE_KEYS ?= deploy/keys
compose-keys: install
	$(BIN)/python -m nexuscore._devkeys $(COMPOSE_KEYS)

schemas: install
	$(BIN)/python -m nexuscore.schemas

clean:
	rm -rf build evidence .pytest_cache .mypy_cache .ruff_cache
