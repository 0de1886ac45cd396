# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8501
# The app listens on this machine only; `make run HOST=0.0.0.0` serves every interface (a class on a LAN).
HOST ?= 127.0.0.1

.PHONY: run test install install-dev lint bench clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Stamps make the install step a no-op until a requirements file changes.
$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, streamlit, skimage, scipy, plotly, pandas" 
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.runtime-installed
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import pytest"
	touch $@

install: $(VENV)/.runtime-installed

install-dev: $(VENV)/.dev-installed

run: install
	$(PY) -m streamlit run app.py --server.headless true --server.address $(HOST) --server.port $(PORT) --browser.gatherUsageStats false

# The browser test needs Debian's chromium: installed here when missing and allowed (root or passwordless
# sudo); otherwise that test skips with one line saying how to run it (and fails under CI=true).
test: install-dev
	@.ci/ensure-chromium || true
	$(PY) -m pytest -q

lint: install-dev
	$(PY) -m ruff check lavp_core lavp_ui pages app.py tests benchmarks

bench: install
	$(PY) benchmarks/attack_speed.py
	$(PY) benchmarks/lavp_speed.py

clean-venv:
	rm -rf $(VENV)
