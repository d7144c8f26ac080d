# Durable AI agent for Microsoft Teams: developer commands. `make` alone lists them.
#
# The first `make run` / `make test` creates .venv (Python 3.11) and node_modules; later runs
# reuse them and reinstall only when requirements*.txt or package*.json change (stamp files).
# Only `make test` (and `soak`) may install system packages: chromium and PostgreSQL, through
# apt-get when run as root (see `test-setup`); `make run` needs nothing but .venv and node_modules.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
VENV_PY     := $(VENV)/bin/python
VENV_STAMP  := $(VENV)/.installed
NODE_STAMP  := node_modules/.installed
# Python used to create the venv: python3.11 if on PATH, else python3 (checked to be 3.11).
PYTHON      ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
# Quiet pip keeps CI logs short; `make PIP_QUIET= test` shows everything.
PIP_QUIET   ?= -q
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k offline -x"`.
PYTEST_ARGS ?=
# Parallel test processes (pytest-xdist). Most tests wait on the real app's processes, not the
# CPU, so 3 fit on 2 cores; `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= 3
# Extra arguments for the packager, e.g. `make package PACKAGE_ARGS="--bot-id GUID"`.
PACKAGE_ARGS ?=

.PHONY: help setup test-setup chromium postgresql run test soak lint package clean distclean

help: ## list the targets
	@echo "Durable AI agent for Microsoft Teams"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20
	@echo
	@echo "Variables: PYTEST_ARGS, PYTEST_WORKERS, PACKAGE_ARGS, KILLS and CLUSTER (soak), PYTHON (interpreter for the venv), PIP_QUIET"

setup: $(VENV_STAMP) $(NODE_STAMP) ## create .venv and node_modules (only what changed); nothing as root

# The tests also need Debian's chromium and PostgreSQL: as root with apt-get, `make test`
# installs them (`test-setup`); otherwise their tests are skipped. `make run` never does.
test-setup: setup chromium postgresql ## setup, plus chromium and PostgreSQL for the tests (apt-get, as root)

run: setup ## start the bot on http://localhost:3978/api/messages
	$(VENV_PY) app.py

# --- peer servers --------------------------------------------------------------------------
# No separate step: pytest starts the peers the tests talk to itself, on loopback, and stops
# them when it ends. Session fixtures run the Cosmos DB wire server (harness/peers/cosmos.py),
# PostgreSQL (harness/peers/postgres.py, from Debian's package, see `postgresql` below) and the
# recording Bot Connector (harness/connector.py); the Agents Playground
# (harness/playground.py) and the bot processes are started per test. A peer that is not
# installed makes its tests skip, with the reason in pytest's summary.
# -------------------------------------------------------------------------------------------

test: test-setup ## run the test suite (pytest); as root, apt-get installs chromium and PostgreSQL first
	$(VENV_PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

soak: test-setup ## crash soak: KILLS (60) random SIGKILLs under load, then the ledger (lost must be 0); CLUSTER=1 for 2 web + 3 workers (kills and freezes)
	$(VENV_PY) scripts/soak.py --kills $(or $(KILLS),60) $(if $(filter-out 0,$(CLUSTER)),--cluster)

.PHONY: bench bench-quick
bench: $(VENV_STAMP) $(NODE_STAMP) ## benchmarks vs their baselines (~15 min on 2 cores): table + bench/results.md
	$(VENV_PY) -m bench

bench-quick: $(VENV_STAMP) $(NODE_STAMP) ## the benchmarks at small sizes (< 2 min), written to test-artifacts/
	$(VENV_PY) -m bench --quick

lint: $(VENV_STAMP) ## ruff check + mypy + secret scan
	@rc=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "secret scan"; $(VENV_PY) scripts/check_secrets.py || rc=1; \
	echo "mypy ."; $(VENV)/bin/mypy . || rc=1; \
	exit $$rc

package: $(VENV_STAMP) ## build build/appPackage.zip for Teams (needs MicrosoftAppId; BOT_DOMAIN, PRIVACY_URL, TERMS_URL optional)
	$(VENV_PY) scripts/package_manifest.py $(PACKAGE_ARGS)

clean: ## remove build output and caches (keeps .venv, node_modules and data/)
	rm -rf build test-artifacts .pytest_cache .mypy_cache .ruff_cache .make
	find . -path ./$(VENV) -prune -o -path ./node_modules -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean ## also remove .venv and node_modules
	rm -rf $(VENV) node_modules

# --- Python virtual environment ------------------------------------------------------------
$(VENV_STAMP): requirements.txt requirements-dev.txt
	@if [ -x "$(VENV_PY)" ] && "$(VENV_PY)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
		echo "updating $(VENV) from requirements-dev.txt"; \
	else \
		if [ -z "$(PYTHON)" ]; then \
			echo "error: no python3.11 or python3 on PATH; install Python 3.11 (or run make PYTHON=/path/to/python3.11)" >&2; \
			exit 1; \
		fi; \
		version=$$("$(PYTHON)" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); \
		if [ "$$version" != "3.11" ]; then \
			echo "error: $(PYTHON) is Python $${version:-(not runnable)}, this project needs Python 3.11" >&2; \
			echo "       (botbuilder 4.17 is tested up to 3.11); install it or run make PYTHON=/path/to/python3.11" >&2; \
			exit 1; \
		fi; \
		echo "creating $(VENV) with $(PYTHON) (Python $$version)"; \
		rm -rf "$(VENV)"; \
		"$(PYTHON)" -m venv "$(VENV)"; \
	fi
	@echo "installing Python packages (a few minutes on a fresh clone) ..."
	$(VENV_PY) -m pip install $(PIP_QUIET) --disable-pip-version-check -r requirements-dev.txt
	$(VENV_PY) -m pip check
	@touch $@

# --- Debian's chromium (the Playground web UI test drives it with npm playwright-core) -----
# Quick when chromium is already on PATH; skipped with a warning (the browser tests then skip)
# when apt-get is missing or we are not root.
chromium: ## install Debian's chromium for the browser tests (root + apt-get; else skipped)
	@if command -v chromium >/dev/null 2>&1; then \
		:; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: chromium not found and no apt-get: skipping it (the browser tests are skipped)" >&2; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "warning: chromium not found and not root: skipping it (as root: apt-get install chromium)" >&2; \
	else \
		echo "installing chromium (apt-get) ..."; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium fonts-noto-color-emoji; \
	fi

# --- Debian's PostgreSQL (harness/peers/postgres.py runs a throwaway server from it) ----------
# Quick when a server binary is already in /usr/lib/postgresql/*/bin; skipped with a warning
# (the PostgreSQL tests are then skipped) when apt-get is missing or we are not root. The
# package's own cluster service is not used: the tests run initdb and postgres themselves.
postgresql: ## install Debian's PostgreSQL for the tests (root + apt-get; else skipped)
	@if compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then \
		:; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "warning: PostgreSQL not found and no apt-get: skipping it (the PostgreSQL tests are skipped)" >&2; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "warning: PostgreSQL not found and not root: skipping it (as root: apt-get install postgresql)" >&2; \
	else \
		echo "installing postgresql (apt-get) ..."; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			postgresql; \
	fi

# --- npm packages (Teams manifest schema; later the Agents Playground) ---------------------
$(NODE_STAMP): package.json $(wildcard package-lock.json)
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "warning: npm not found: skipping node packages (tests that need them are skipped)" >&2; \
	elif [ -f package-lock.json ]; then \
		echo "npm ci"; npm ci --no-audit --no-fund --loglevel=error && touch $@; \
	else \
		echo "npm install"; npm install --no-audit --no-fund --loglevel=error && touch $@; \
	fi
