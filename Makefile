# dpo-cli developer commands. `make demo` and `make test` work on a fresh machine: they install what they need into
# a project virtualenv, `.venv`, or into the active one when VIRTUAL_ENV is set. They never install into the system
# python, which PEP 668 (Debian, Ubuntu) and PIP_REQUIRE_VIRTUALENV forbid.
#   PYTHON: the interpreter that creates .venv (default python3); VENV: use this virtualenv folder instead.
PYTHON ?= python3
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned to the CPU build this project is tested with; an unpinned torch pulls a multi-GB CUDA build.
# GPU users: `make install TORCH=torch`.
TORCH ?= torch==2.13.0
# The stamp lives in the virtualenv, so another environment (or a new .venv) gets its own install.
STAMP := $(VENV)/.dpo-cli-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install venv demo test test-fast bench lint clean

install: $(STAMP)

venv: $(VENV)/pyvenv.cfg

# A venv that failed halfway is removed, so the next `make` tries again instead of using it. A folder that exists
# but is no virtualenv is never touched.
$(VENV)/pyvenv.cfg:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
		{ echo "error: $(PYTHON) -m venv is missing; install it with: apt install python3-venv" >&2; exit 1; }
	@if [ -e "$(VENV)" ]; then \
		echo "error: $(VENV) exists but is not a virtualenv; remove it or name another with VENV=" >&2; exit 1; fi
	$(PYTHON) -m venv "$(VENV)" || { rm -rf "$(VENV)"; exit 1; }

$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	@touch "$(STAMP)"

demo: $(STAMP)
	$(PY) -m dpo_cli.demo demo-out
	@mkdir -p docs && cp demo-out/report.png docs/demo-report.png  # the README's figure

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/compare_trl.py --preset cpu

lint: $(STAMP)
	$(PY) -m ruff check dpo_cli tests bench
	$(PY) -m ruff format --check dpo_cli tests bench

# .venv stays: rebuilding it takes a minute or more. `rm -rf .venv` to start over.
clean:
	rm -rf .make demo-out .pytest_cache
