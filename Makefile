# Two commands: `make demo` (install + the whole pipeline on the built-in toy world)
# and `make test` (install + the test suite). Both create .venv on first use.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.venv/installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch .venv/installed

install: .venv/installed

test: .venv/installed
	$(PY) -m pytest -q

demo: .venv/installed
	$(PY) -c "print('demo: filled in by the toy-world stage')"

.PHONY: install test demo
