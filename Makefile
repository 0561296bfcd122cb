# The commands a newcomer types. The first one creates .venv and installs everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Exactly this release: a CPU wheel of it lies on our build machines; on a GPU host PyPI's build is CUDA.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install browser serve serve-ray test test-fast bench load load-ray clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo page's browser test drives Debian's chromium (never a browser that a test tool downloads).
# Checked on every run, installed when missing: CI runs `make test` as root on a fresh machine.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "make: installing Debian's chromium for the browser test (needs root)"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

serve: $(STAMP)
	$(BIN)/csmserve serve

# Replicas behind Ray's proxy (docs/scale-out.md): a local Ray cluster started by `serve run`, stopped by Ctrl-C.
RAY_CONFIG ?= deploy/ray/local.yaml
serve-ray: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/serve run $(RAY_CONFIG)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/batching.py

load: $(STAMP)
	$(BIN)/python bench/load.py

# The single server vs two Ray Serve replicas, side by side (a local Ray cluster, stopped at the end).
load-ray: $(STAMP)
	$(BIN)/python bench/ray_load.py

clean:
	rm -rf $(VENV) var .pytest_cache
