# spectrumd — `make demo` runs the demo, `make test` runs linters and all tests.
# Both install what they need (as root on Debian 12) and skip what is done.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GUEST_DIR ?= /var/cache/spectrumd/guest
export SPECTRUMD_GUEST_DIR := $(GUEST_DIR)

# make install-desktop: the desktop entries of spectrum-agent and spectrum-manager.
PREFIX ?= /usr/local
DESTDIR ?=
APPLICATIONS_DIR := $(PREFIX)/share/applications
AUTOSTART_DIR ?= /etc/xdg/autostart

.PHONY: all deps venv guest test lint unit integration demo bench clean install-desktop

all: test

deps:
	@sh scripts/install-deps.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@sh scripts/venv-gi.sh $(VENV)
	@# Stubs for gi (mypy); they depend on PyPI's PyGObject, which is Debian's here: --no-deps.
	PYGOBJECT_STUB_CONFIG=Gtk4,Gdk4 $(PY) -m pip install -q --no-deps 'pygobject-stubs==2.20.0'
	@touch $@

venv: $(VENV)/.installed

guest: deps
	@sh guest/build.sh $(GUEST_DIR)

lint: venv
	$(VENV)/bin/ruff check spectrumd tests bench demo
	$(VENV)/bin/ruff format --check spectrumd tests bench demo
	$(VENV)/bin/mypy

test: deps venv guest lint
	$(VENV)/bin/pytest -q

unit: venv
	$(VENV)/bin/pytest -q tests/unit

demo: deps venv guest
	$(PY) demo/run_demo.py

bench: deps venv guest
	$(PY) bench/run.py
	$(PY) bench/fs_bench.py
	$(PY) bench/net_bench.py
	$(PY) bench/cycles_bench.py
	$(PY) bench/mem_bench.py

install-desktop:
	install -d $(DESTDIR)$(APPLICATIONS_DIR) $(DESTDIR)$(AUTOSTART_DIR)
	install -m 644 data/spectrum-agent.desktop data/spectrum-manager.desktop $(DESTDIR)$(APPLICATIONS_DIR)/
	install -m 644 data/spectrum-agent-autostart.desktop $(DESTDIR)$(AUTOSTART_DIR)/spectrum-agent.desktop

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
