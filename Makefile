# gputrace: the two commands first (make run, make test); the rest is for ops and developers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help run test install lint format fetch-kafka demo bench bench-api chaos chaos-cluster up down logs docs clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: install ## Start Kafka and every service on this machine (no Docker); Ctrl-C stops all (ARGS="--kafka-port 0")
	$(BIN)/gputrace run $(ARGS)

test: install ## The whole test suite against real Kafka 4.x and PostgreSQL (started by the tests)
	$(BIN)/pytest

$(STAMP): pyproject.toml verifier/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is needed (PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./verifier -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create the virtualenv and install gputrace with its dev tools

fetch-kafka: ## Fetch the Kafka jars from Maven Central into the cache (done by run and test when needed)
	bash infra/kafka/kafka.sh fetch

lint: install ## ruff
	$(BIN)/ruff check .

format: install ## ruff format
	$(BIN)/ruff format .

demo: install ## Publish the 260,000-GPU programme against whatever is running (make run or compose; SCALE=1.0)
	$(BIN)/gputrace demo --scale $${SCALE:-1.0} --serials

bench: install ## Throughput against raw aiokafka and raw PostgreSQL in the same run (EVENTS=5000)
	$(BIN)/python -m tests.benchmarks.bench_pipeline --events $${EVENTS:-5000}

bench-api: install ## Auditor API p50/p95/p99 at 50 clients vs /healthz, proofs at 10^6 entries (ENTRIES=1000000)
	$(BIN)/python -m tests.benchmarks.bench_api --log-entries $${ENTRIES:-1000000}

chaos: install ## Seeded SIGKILLs of every service, the broker and PostgreSQL under load (EVENTS=20000 SEED=1)
	$(BIN)/python -m tests.chaos --events $${EVENTS:-20000} --seed $${SEED:-1}

chaos-cluster: install ## 3 brokers, 2 replicas of every service: SIGSTOP/SIGKILL a replica, a leader's broker, the active ledger (EVENTS=4000 SEED=1)
	$(BIN)/python -m tests.cluster --events $${EVENTS:-4000} --seed $${SEED:-1}

up: ## docker compose up (needs a Docker engine)
	docker compose up -d --build

down: ## docker compose down
	docker compose down

logs: ## docker compose logs
	docker compose logs -f

docs: install ## Regenerate docs/ (AsyncAPI, OpenAPI) from the code
	$(BIN)/gputrace docs

clean: ## Remove local data (var/); keeps the venv and the Kafka jar cache
	rm -rf var
