# The commands a newcomer types. `make serve` creates .venv with the runtime dependencies only;
# `make test` adds the dev extras (Ray, LiveKit, pipecat, Playwright, ...) to the same .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Exactly this release: a CPU wheel of it lies on our build machines; on a GPU host PyPI's build is CUDA.
TORCH_SPEC ?= torch==2.13.0
# One stamp per install step: the runtime, then each extra on top of it (dev, ray, docs). A change to
# pyproject.toml redoes the runtime stamp, which redoes every extra installed after it.
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
RAY := $(VENV)/.installed-ray
DOCS := $(VENV)/.installed-docs
SITE ?= site

.PHONY: install browser serve serve-ray test test-fast docs docs-serve bench bench-gpu load load-ray clean

install: $(RUNTIME)

$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# An extra on top of the runtime; torch stays the pinned build (the extras only ask for torch>=2.4).
$(VENV)/.installed-%: $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

# The demo page's browser test drives Debian's chromium (never a browser that a test tool downloads).
# Checked on every run, installed when missing: CI runs `make test` as root on a fresh machine.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "make: installing Debian's chromium for the browser test (needs root)"; \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

serve: $(RUNTIME)
	$(BIN)/csmserve serve

# Replicas behind Ray's proxy (docs/scale-out.md): a local Ray cluster started by `serve run`, stopped by Ctrl-C.
RAY_CONFIG ?= deploy/ray/local.yaml
serve-ray: $(RAY)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/serve run $(RAY_CONFIG)

test: $(DEV) browser
	$(BIN)/python -m pytest -q

test-fast: $(DEV) browser
	$(BIN)/python -m pytest -q -m "not slow"

# The documentation site (MkDocs, Material theme) from docs/ into $(SITE)/ (git-ignored). --strict: a broken
# link, a page missing from the nav or a failing hook stops the build; make test runs the same build.
# NO_MKDOCS_2_WARNING: Material prints a banner about its end of life (May 2027) on every build.
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

docs-serve: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

bench: $(RUNTIME)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/gpu.py

# On a GPU host: the bare step per batch size and the server with 1-256 streams (docs/benchmarks.md, "GPU").
bench-gpu: $(RUNTIME)
	$(BIN)/python bench/gpu.py --write docs/benchmarks.md

load: $(DEV)
	$(BIN)/python bench/load.py

# The single server vs two Ray Serve replicas, side by side (a local Ray cluster, stopped at the end).
load-ray: $(DEV)
	$(BIN)/python bench/ray_load.py

clean:
	rm -rf $(VENV) var .pytest_cache $(SITE)
