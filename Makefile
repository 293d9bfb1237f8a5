# zerostack — one command to set up and run the demo, one to set up and run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip itself is pinned; every other package is pinned by constraints.txt (runtime and dev)
# and build-constraints.txt (what builds the package); `make lock` regenerates both.
PIP_VERSION := 26.3
# Modules compiled with mypyc (setup.py): editing one needs a reinstall to take effect.
NATIVE_MODULES := $(shell sed -n 's/^    "\(zerostack\.[a-z_.]*\)",$$/\1/p' src/zerostack/zdb/native.py)
NATIVE_SRC := $(patsubst %,src/%.py,$(subst .,/,$(NATIVE_MODULES)))

.PHONY: setup demo test lint bench lock clean screenshots explorer-vendor

$(STAMP): pyproject.toml setup.py constraints.txt build-constraints.txt src/zerostack/zdb/native.py $(NATIVE_SRC)
	@if [ "$$(id -u)" = 0 ]; then bash scripts/install-system-deps; else echo "not root: skipping system packages"; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==$(PIP_VERSION)
	$(BIN)/pip install -q -c constraints.txt --build-constraint build-constraints.txt -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/zerostack story

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# the explorer's pages, photographed in headless Chromium against a small grid
screenshots: $(STAMP)
	EXPLORER_SCREENSHOTS=docs/explorer $(BIN)/pytest -q \
		tests/ledger/test_explorer.py -k screenshots

# refresh the vendored @noble/hashes files from package-lock.json (needs node and npm)
EXPLORER_VENDOR := src/zerostack/ledger/explorer/static/vendor/noble-hashes
explorer-vendor:
	npm ci --ignore-scripts --no-audit --no-fund
	for f in blake2 _blake _md _u64 utils; do cp node_modules/@noble/hashes/$$f.js $(EXPLORER_VENDOR)/; done
	cp node_modules/@noble/hashes/LICENSE $(EXPLORER_VENDOR)/

lock:
	PY=$(PY) bash scripts/update-lock

clean:
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache
	find src -name '*.so' -delete
