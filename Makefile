# make test: set up .venv (Python 3.11) and run lint + tests.  make demo: the whole pipeline, small, on the CPU.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: test demo lint

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11, got " + sys.version'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py
