# The front door: `make demo` and `make test` work on a fresh Debian / Raspberry Pi OS box with python3.
# Both create .venv on first use; `make test` installs Mosquitto with apt-get when it is missing.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
MOSQUITTO ?= /usr/sbin/mosquitto
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit faults bench clean mosquitto venv system arm64 lock lock-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@python3 -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing python3-venv"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

mosquitto:
	@test -x $(MOSQUITTO) || { echo "installing mosquitto"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q mosquitto; }

demo: venv mosquitto
	$(VENV)/bin/edgeagent demo

lint: venv
	$(VENV)/bin/ruff check edgeagent tests
	$(VENV)/bin/ruff format --check edgeagent tests

typecheck: venv
	$(VENV)/bin/mypy

test: venv mosquitto lint typecheck
	$(VENV)/bin/pytest

unit: venv
	$(VENV)/bin/pytest tests/unit

faults: venv mosquitto
	$(VENV)/bin/pytest -m slow

bench: venv mosquitto
	$(PY) -m tests.bench

# The system tier (tests/system): the checkout installed with deploy/install.sh on a Debian bookworm
# booted with a real systemd (systemd-nspawn), as root. The rootfs is built once and cached in
# /var/tmp/edgeagent-system (rebuilt when its package list changes). The checks are steps of one
# scenario on one box: -x stops at the first failed step (the ones after it would only time out).
system: venv
	$(VENV)/bin/pytest -m system tests/system -p no:cacheprovider -x -s

# The checkout in a Debian bookworm arm64 rootfs under qemu-user: wheels used, edgeagent check, unit tests.
arm64: venv
	$(PY) -m tests.system.arm64

# deploy/requirements.lock: the hashed dependency set install.sh installs (amd64, arm64, armhf).
lock: venv
	$(PY) -m tests.system.lockfile build

lock-check: venv
	$(PY) -m tests.system.lockfile check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
