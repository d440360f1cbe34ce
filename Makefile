# dpo-cli developer commands. `make demo` and `make test` work on a fresh machine: they install what they need.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is pinned to the CPU build this project is tested with; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := .make/installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	@mkdir -p .make && touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m dpo_cli.demo demo-out
	@mkdir -p docs && cp demo-out/report.png docs/demo-report.png  # the README's figure

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) bench/bench_train.py

lint: $(STAMP)
	$(PYTHON) -m ruff check dpo_cli tests bench
	$(PYTHON) -m ruff format --check dpo_cli tests bench

clean:
	rm -rf .make demo-out .pytest_cache
