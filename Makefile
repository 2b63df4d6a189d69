# Everyday commands. `make` alone lists them.
#
# Prerequisites run left to right, never in parallel (`make -j` included):
# `test` relies on that order.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

CARGO ?= cargo
COMPOSE ?= docker compose
# Extra arguments for `make bench`, e.g. make bench ARGS="--runs 5000 --workers 4"
ARGS ?=

.PHONY: help deps fmt lint build test run bench up down proto

help: ## List the targets
	@echo "Colony — make targets:"
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-8s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

deps: ## Make sure PostgreSQL (127.0.0.1:5432) and NATS+JetStream (127.0.0.1:4222) are up
	scripts/ensure-services.sh

fmt: ## Format all code
	$(CARGO) fmt --all

lint: ## Check formatting and run clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build: ## Build every binary in the workspace (debug)
	$(CARGO) build --workspace --bins

test: deps lint build ## deps, lint, build, then the whole test suite (nextest if installed)
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not installed; $(CARGO) test --workspace --no-fail-fast"; \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

run: ## Build and run the whole stack natively (Ctrl-C stops it; PROFILE=debug for a debug build)
	scripts/run-native.sh

bench: deps ## Run the dispatch benchmark on release builds (results: docs/benchmarks.md, target/bench/results.json)
	$(CARGO) build --release --workspace --bins
	target/release/dispatch-bench $(ARGS)

up: ## Build the images and start the Docker Compose stack
	$(COMPOSE) up -d --build

down: ## Stop the Docker Compose stack (data volumes are kept; add -v by hand to drop them)
	$(COMPOSE) down

proto: ## Compile proto/ (protox runs at build time; no protoc, nothing generated is committed)
	@echo "proto/ is compiled by colony-proto's build script (pure-Rust protox) on every build;"
	@echo "there is nothing to generate by hand. Building colony-proto to check the protos:"
	$(CARGO) build -p colony-proto
