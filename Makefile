# fastret: `make demo` runs the main job end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data
DEMO_DIR := .demo

.PHONY: setup demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,demo,web,ray,lancedb]'
	touch $@

setup: $(VENV)/.installed

# Index a real photo gallery and search it, offline: the course's Wang/Corel-1000 set when
# ../shared/data is present, else the sample photos that scikit-image ships in its wheel.
demo: setup
	@export FASTRET_CACHE=$(CURDIR)/$(DEMO_DIR)/cache HF_HUB_OFFLINE=1; \
	if [ -d $(SHARED_DATA)/wang1k ]; then \
	  gallery=$(SHARED_DATA)/wang1k; query=$(SHARED_DATA)/wang1k/buildings/299.jpg; \
	else \
	  gallery=$$($(PY) -c 'import pathlib, skimage; print(pathlib.Path(skimage.__file__).parent / "data")'); \
	  query=$$gallery/motorcycle_left.png; \
	fi; \
	set -ex; \
	$(VENV)/bin/fastret index $$gallery --model efficientnet-lite2 --out $(DEMO_DIR)/index; \
	$(VENV)/bin/fastret search $$query --index $(DEMO_DIR)/index

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
