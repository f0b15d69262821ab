# Every target installs what it needs: a fresh clone runs `make run` or `make test` and nothing else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := clang lld wasi-libc libclang-rt-14-dev-wasm32
# What the tests run besides the toolchain: the dashboard's browser tests drive Debian's chromium through its
# chromedriver (nothing downloaded at run time); the guest debugging tests run gdb.
TEST_APT_PKGS := chromium chromium-driver gdb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck pytest plugins toolchain test-tools js-client bench clean

# A host node serving plugins/build on an embedded nats-server with JetStream (Ctrl-C drains and stops).
run: $(STAMP) plugins
	$(BIN)/sandbus node --plugins plugins/build --policy plugins/policy.toml

test: $(STAMP) plugins lint typecheck pytest

$(STAMP): pyproject.toml setup.py host/sandbox/_native.c host/sandbox/_component.c host/sandbox/_ticker.c sdk/_frames.c
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# The C toolchain for wasm32-wasi (Debian packages); installed when missing.
toolchain:
	@if ! printf 'int main(void){return 0;}' | clang --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor \
	      -x c -o /dev/null - >/dev/null 2>&1; then \
	  echo "installing the wasm32-wasi C toolchain: $(APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi

# The programs the tests drive (Debian packages); installed when missing.
test-tools:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
	      || ! command -v gdb >/dev/null 2>&1; then \
	  echo "installing what the tests drive: $(TEST_APT_PKGS)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(TEST_APT_PKGS) >/dev/null; \
	fi

plugins: $(STAMP) toolchain
	PYTHON=$(BIN)/python bash plugins/build.sh

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The JavaScript protocol client (tests/protocol/js) and its locked npm dependencies. Without them its test
# is skipped, and fails when CI=true.
JS_CLIENT := tests/protocol/js
JS_STAMP := $(JS_CLIENT)/node_modules/.installed

js-client: $(JS_STAMP)

$(JS_STAMP): $(JS_CLIENT)/package.json $(JS_CLIENT)/package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "npm not found: the JavaScript protocol client test (tests/protocol/test_js_client.py) will be skipped"; \
	elif npm ci --prefix $(JS_CLIENT) --no-audit --no-fund --loglevel=error; then \
	  touch $@; \
	else \
	  echo "npm ci failed: the JavaScript protocol client test will be skipped (it fails when CI=true)"; \
	fi

pytest: $(STAMP) plugins test-tools $(JS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP) plugins
	$(BIN)/python bench/bench_sandbox.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_lifecycle.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_bus.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_dashboard.py $(BENCH_ARGS)

clean:
	rm -rf plugins/build .pytest_cache .mypy_cache .ruff_cache sdk/guest/assemblyscript/node_modules \
	       $(JS_CLIENT)/node_modules plugins/*/node_modules tests/extism/node_modules tests/extism/build
