# Two commands do everything: `make demo` (train on the demo set) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test

# __init__.py too: an editable install made before it existed maps `happysad` as a namespace package, and
# its code (TensorFlow's oneDNN default) would never run.
$(VENV)/.installed: pyproject.toml happysad/__init__.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) jobs/train.py

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15
