# Everyday commands. `make` alone lists them.
#
# Prerequisites run left to right, never in parallel (`make -j` included):
# `test` relies on that order.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

CARGO ?= cargo
# apt-get runs through sudo unless make already runs as root.
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)
COMPOSE ?= docker compose
# Extra arguments for `make bench`, e.g. make bench ARGS="--runs 5000 --workers 4"
ARGS ?=
# Extra arguments for the peer-queue bench, e.g. make bench PEER_ARGS="--pubsub"
PEER_ARGS ?=
# Extra arguments for the router bench, e.g. make bench-router ROUTER_ARGS="--rate 500 --skip-litellm"
ROUTER_ARGS ?=
# Extra arguments for the inference bench, e.g. make bench-inference INFERENCE_ARGS="--runs 9"
INFERENCE_ARGS ?=
# Extra arguments for the memory bench, e.g. make bench-memory MEMORY_ARGS="--memories 20000"
MEMORY_ARGS ?=
# Extra arguments for the worker bench, e.g. make bench-worker WORKER_ARGS="--slots 1 --runs 800"
WORKER_ARGS ?=
# Extra arguments for the telemetry bench, e.g. make bench-telemetry TELEMETRY_ARGS="--runs 4000 --rounds 5"
TELEMETRY_ARGS ?=

.PHONY: help deps build-deps sdk-env models fmt lint build test run bench bench-router bench-inference bench-memory bench-worker bench-telemetry up down proto promtool check-alerts

# The router overhead bench, in `bench` and `bench-router`. LiteLLM goes into a venv under
# target/ when missing; if that fails the bench still runs and reports LiteLLM as missing.
define ROUTER_BENCH
	$(CARGO) build --release -p colony-router -p colony-e2e
	scripts/litellm-venv.sh || echo "LiteLLM could not be installed: router-bench reports the router alone"
	target/release/router-bench $(ROUTER_ARGS)
endef

# The embedded inference bench, in `bench` and `bench-inference`. llama.cpp's Python build goes
# into a venv under target/ for the side-by-side (about 7 minutes the first time); if that fails
# the bench still runs and reports llama.cpp as missing.
define INFERENCE_BENCH
	$(CARGO) build --release -p colony-e2e --bin inference-bench
	scripts/llamacpp-venv.sh >/dev/null || echo "llama-cpp-python could not be installed: inference-bench reports Colony alone"
	target/release/inference-bench $(INFERENCE_ARGS)
endef

# The memory bench, in `bench` and `bench-memory`: search over 100,000 vectors and writes
# through the release memory service.
define MEMORY_BENCH
	$(CARGO) build --release -p colony-memory --bin colony-memory
	$(CARGO) build --release -p colony-e2e --bin memory-bench
	target/release/memory-bench $(MEMORY_ARGS)
endef

# The worker bench, in `bench` and `bench-worker`: throughput with 1, 2 and 4 agent-worker
# replicas and a 50-ms scripted model, and the worker's own time per step.
define WORKER_BENCH
	$(CARGO) build --release --workspace --bins
	target/release/worker-bench $(WORKER_ARGS)
endef

# The telemetry bench, in `bench` and `bench-telemetry`: the spine's drain with OTLP span export
# off and on (an in-process receiver), alternating, on fresh stacks.
define TELEMETRY_BENCH
	$(CARGO) build --release --workspace --bins
	target/release/telemetry-bench $(TELEMETRY_ARGS)
endef

TELEMETRY_KEYS := telemetry_export_off_tasks_per_s telemetry_export_on_tasks_per_s telemetry_overhead_pct \
	telemetry_spans_per_task

WORKER_KEYS := worker_throughput_1 worker_throughput_2 worker_throughput_4 worker_scaling_1_to_4 \
	worker_step_overhead_ms

MEMORY_KEYS := memory_search_p50_ms memory_search_p99_ms memory_recall_at_10 memory_writes_per_s \
	memory_index_rebuild_s memory_rss_mb

INFERENCE_KEYS := local_llm_tokens_per_s llamacpp_tokens_per_s local_llm_vs_llamacpp local_llm_prompt_tokens_per_s \
	llamacpp_prompt_tokens_per_s embed_sentences_per_s inference_rss_mb

# $(call bench_summary,KEY...): those figures of target/bench/results.json, "-" when absent.
bench_summary = python3 -c 'import json,sys; r=json.load(open("target/bench/results.json")); \
	print("\nsummary (target/bench/results.json)"); \
	[print("  %-34s %s" % (k, ("%.2f" % r[k]) if k in r else "-")) for k in sys.argv[1:]]' $(1)

ROUTER_KEYS := router_overhead_p50_ms router_overhead_p99_ms router_internal_overhead_p99_ms litellm_overhead_p99_ms \
	router_litellm_overhead_ratio_p99 router_rss_mb router_achieved_per_s litellm_achieved_per_s

help: ## List the targets
	@echo "Colony — make targets:"
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-16s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

deps: ## Make sure PostgreSQL (127.0.0.1:5432) and NATS+JetStream (127.0.0.1:4222) are up
	scripts/ensure-services.sh

# llama.cpp is compiled into the router (the embedded chat model): its build needs cmake, and
# libclang for the generated bindings. Installed from Debian's packages when missing.
build-deps: ## Install what compiling llama.cpp needs (cmake, libclang-dev) when missing
	@if ! command -v cmake >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then \
		echo "installing cmake and libclang-dev (needed to compile llama.cpp)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake libclang-dev; \
	fi

# promtool checks and unit-tests the Prometheus alert rules; Debian's `prometheus` package has it.
promtool: ## Install promtool (Debian package prometheus) when missing
	@if ! command -v promtool >/dev/null 2>&1; then \
		echo "installing prometheus (for promtool)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	fi

check-alerts: promtool ## Check the Prometheus alert rules and run their unit tests (deploy/prometheus)
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml

# OpenAI's official Python client, for the router's compatibility test (version pinned).
SDK_ENV := target/sdk-env
OPENAI_SDK := openai==3.57.0

sdk-env: ## Install OpenAI's Python client into target/sdk-env (the router's compatibility test uses it)
	@if ! $(SDK_ENV)/bin/python -c 'import openai' >/dev/null 2>&1; then \
		python3 -m venv $(SDK_ENV) && \
		$(SDK_ENV)/bin/pip install --quiet --disable-pip-version-check '$(OPENAI_SDK)'; \
	fi

models: ## Fetch the embedded default's models (SmolLM2-135M GGUF, all-MiniLM-L6-v2) into .cache/models (COLONY_MODELS_DIR)
	scripts/fetch-models.sh

fmt: ## Format all code
	$(CARGO) fmt --all

lint: build-deps ## Check formatting and run clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build: build-deps ## Build every binary in the workspace (debug)
	$(CARGO) build --workspace --bins

test: deps build-deps models sdk-env lint check-alerts build ## deps, build-deps, models, sdk-env, lint, check-alerts, build, then the whole test suite (nextest if installed)
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not installed; $(CARGO) test --workspace --no-fail-fast"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

run: build-deps models ## Build and run the whole stack natively (Ctrl-C stops it; PROFILE=debug for a debug build)
	scripts/run-native.sh

bench: deps build-deps models ## Dispatch, peer-queue (apalis-postgres), router, inference, memory, worker and telemetry benches on release builds, then a summary (docs/benchmarks.md)
	$(CARGO) build --release --workspace --bins
	$(CARGO) build --release --manifest-path benches/peer-queue/Cargo.toml
	target/release/dispatch-bench $(ARGS)
	target/release/dispatch-bench --work model --phases drain --drain-runs 3000
	benches/peer-queue/target/release/peer-queue-bench $(PEER_ARGS)
	$(ROUTER_BENCH)
	$(INFERENCE_BENCH)
	$(MEMORY_BENCH)
	$(WORKER_BENCH)
	$(TELEMETRY_BENCH)
	@$(call bench_summary,dispatch_p50_ms dispatch_p99_ms dispatch_p99_loaded_ms \
		dispatch_loaded_completed_per_s throughput_tasks_per_s drain_cpu_us_per_task_total \
		drain_cpu_us_per_task_postgres drain_cpu_us_per_task_nats model_throughput_tasks_per_s \
		peer_queue_tasks_per_s $(ROUTER_KEYS) $(INFERENCE_KEYS) $(MEMORY_KEYS) $(WORKER_KEYS) \
		$(TELEMETRY_KEYS))
	@python3 -c 'import json; r=json.load(open("target/bench/results.json")); \
	c,p=r.get("throughput_tasks_per_s"),r.get("peer_queue_tasks_per_s"); \
	print("  %-34s %s" % ("drain: Colony / peer queue", ("%.2fx" % (c/p)) if c and p else "-"))'

bench-router: deps build-deps ## Router overhead bench only (0-ms stub: direct, router, LiteLLM proxy), then its summary
	$(ROUTER_BENCH)
	@$(call bench_summary,$(ROUTER_KEYS))

bench-inference: deps build-deps models ## Embedded inference bench only (chat next to llama.cpp, embeddings, memory), then its summary
	$(INFERENCE_BENCH)
	@$(call bench_summary,$(INFERENCE_KEYS))

bench-memory: deps build-deps models ## Memory bench only (search p50/p99 and recall@10 over 100,000 vectors, writes/s), then its summary
	$(MEMORY_BENCH)
	@$(call bench_summary,$(MEMORY_KEYS))

bench-worker: deps build-deps models ## Worker bench only (throughput with 1, 2 and 4 replicas, a 50-ms model; overhead per step), then its summary
	$(WORKER_BENCH)
	@$(call bench_summary,$(WORKER_KEYS))

bench-telemetry: deps build-deps models ## Telemetry bench only (the drain with OTLP span export off and on), then its summary
	$(TELEMETRY_BENCH)
	@$(call bench_summary,$(TELEMETRY_KEYS))

up: ## Build the images and start the Docker Compose stack
	$(COMPOSE) up -d --build

down: ## Stop the Docker Compose stack (data volumes are kept; add -v by hand to drop them)
	$(COMPOSE) down

proto: ## Compile proto/ (protox runs at build time; no protoc, nothing generated is committed)
	@echo "proto/ is compiled by colony-proto's build script (pure-Rust protox) on every build;"
	@echo "there is nothing to generate by hand. Building colony-proto to check the protos:"
	$(CARGO) build -p colony-proto
