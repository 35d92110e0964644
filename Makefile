# make demo: set everything up and run the main job.  make test: set up and run the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.c csrc/*.h csrc/*.py luna_shm/*.py)
CFLAGS_STRICT := -std=gnu11 -Wall -Wextra -Werror -O2

.PHONY: demo test test-c system-deps bench fuzz lint clean

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,dev]'
	touch $@

demo: $(STAMP)
	$(PY) -m luna_shm demo

# sox is a test oracle from Debian's packages: installed here when we are root.
system-deps:
	@command -v sox >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sox >/dev/null; \
	  else echo "note: sox is not installed; the tests that use it will be skipped"; fi; }

# Our C must compile with no warnings at all.
test-c:
	@for f in csrc/*.c; do $(CC) $(CFLAGS_STRICT) -Icsrc -c $$f -o /dev/null || exit 1; done
	@echo "C layer: no warnings with $(CFLAGS_STRICT)"

test: $(STAMP) system-deps test-c
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest benchmarks

clean:
	rm -rf $(VENV) build *.egg-info luna_shm/_native*.so .pytest_cache .hypothesis .benchmarks
