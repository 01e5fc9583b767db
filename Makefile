# Two commands for a newcomer: `make demo` (see it work) and `make test` (the whole suite; CI runs it).
# Both install what they need: Java 17 and Maven (via apt-get when missing and allowed), Debian's
# prometheus package (prometheus + promtool, for the alert-rule and real-Prometheus tests), a virtual
# env with the Python packages, and the Kafka jars (fetched by the code itself on first use).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format typecheck alerts unit integration install lock system-deps clean

demo: install
	$(BIN)/propstream demo

# --durations: the slowest tests, printed at the end, so a growing suite shows where it grows
test: install lint typecheck
	$(BIN)/python -m pytest -q --durations=15

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

# setuptools notes on every editable install of a flat layout that folders named like the packages
# in the working directory take precedence: here that is the point, so the notice is only noise.
EDITABLE := PYTHONWARNINGS='ignore:Editable installation'

# constraints.txt pins every package to the tested version (`make lock` moves them, see README.md).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(EDITABLE) $(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Every extra pyproject.toml defines, so the lock covers them all ("test" today).
EXTRAS    = $(shell $(PYTHON) -c "import tomllib; print(','.join(tomllib.load(open('pyproject.toml', 'rb'))['project'].get('optional-dependencies', {})))")
LOCK_FILE ?= constraints.txt

# The newest versions pyproject.toml allows, resolved in a throwaway venv without constraints.
# Written to a temporary file first: a failed resolve leaves the old lock in place.
lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q --upgrade pip; \
	$(EDITABLE) PIP_CONSTRAINT= "$$tmp/venv/bin/pip" install -q -e '.[$(EXTRAS)]'; \
	{ echo "# The tested versions of everything propstream and its extras install (Python 3.11): make and"; \
	  echo "# deploy/Dockerfile install with \`pip install -c constraints.txt\`. Regenerate with \`make lock\`;"; \
	  echo '# see README.md, "Dependencies and upgrades".'; \
	  "$$tmp/venv/bin/pip" freeze --exclude-editable | grep -iv '^propstream=='; } > "$$tmp/lock.txt"; \
	mv "$$tmp/lock.txt" $(LOCK_FILE); \
	echo "wrote $(LOCK_FILE) ($$(grep -vc '^#' $(LOCK_FILE)) pins, extras: $(EXTRAS)); now run make test and commit both"

system-deps:
	@bash deploy/system-deps.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
