# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint clean-venv

# Re-install only when pyproject.toml changes; pip reads torch from the machine's local mirror.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/sanitizer demo

test: $(BIN)/.installed lint
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check sanitizer jobs bench tests examples
	$(BIN)/ruff format --check sanitizer jobs bench tests examples
	$(BIN)/hadolint Dockerfile

clean-venv:
	rm -rf $(VENV)
