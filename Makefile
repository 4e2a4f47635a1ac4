# Two set-up-free entry points (README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test oracle clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Oracle virtualenv (torch + upstream GPT-SoVITS, test-only) and its fixtures, cached in ~/.cache.
oracle: $(VENV)/.installed
	$(PY) tools/oracle/oracle_env.py fixtures

demo: $(VENV)/.installed
	$(PY) tools/demo.py

test: oracle
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out
