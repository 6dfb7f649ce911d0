# make test: set up .venv (Python 3.11) and run lint + tests (keeping only failed tests' temporary folders: the
# suite writes about 1 GB of them, and a full disk fails it).  make demo: the whole pipeline, small, on the CPU.
# make utility: the demo's steps with the recipe of presets/utility.py (about 45 min); outputs in utility_work/.
# make curve: a small privacy-utility curve (presets/curve.py; demo.py --curve runs sweep.py from the demo's public
# GAN) on the CPU; outputs in curve_work/.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements

.PHONY: test demo lint curve utility
CURVE := DPGAN_PRESET=curve DPGAN_DATA_DIR=demo_data DPGAN_WORK_DIR=curve_work
CURVE_JOBS ?= 2

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "need Python 3.11, got " + sys.version'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@cp requirements.txt $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 -o tmp_path_retention_policy=failed -o tmp_path_retention_count=1 tests

demo: $(STAMP)
	$(PY) demo.py

utility: $(STAMP)
	DPGAN_PRESET=utility DPGAN_DATA_DIR=demo_data DPGAN_WORK_DIR=utility_work $(PY) demo.py

curve: $(STAMP)
	$(CURVE) $(PY) demo.py --curve --max_parallel $(CURVE_JOBS)
