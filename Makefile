# Two commands for a newcomer: `make demo` (see it work) and `make test` (the whole suite; CI runs it).
# Both install what they need: Java 17 and Maven (via apt-get when missing and allowed), Debian's
# prometheus package (prometheus + promtool, for the alert-rule and real-Prometheus tests), a virtual
# env with the Python packages, and the Kafka jars (fetched by the code itself on first use).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format typecheck alerts unit integration install system-deps clean

demo: install
	$(BIN)/propstream demo

test: install lint typecheck
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q -m "not integration"

integration: install
	$(BIN)/python -m pytest -q -m integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy streams features models traffic

# The suite runs these too (tests/unit/test_promtool.py); this is the quick loop when editing rules.
alerts: system-deps
	promtool check config deploy/prometheus/prometheus.yml
	promtool test rules deploy/prometheus/alerts_test.yml

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

system-deps:
	@bash deploy/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
