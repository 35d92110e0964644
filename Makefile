# make demo: set up what the demo needs (the library: numpy and cffi) and run the main job.
# make test: set everything up (test, lint and packaging tools too) and run the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.c csrc/*.h csrc/*.py src/luna_shm/*.py src/luna_shm/cache/*.py src/luna_shm/pool/*.py)
CFLAGS_STRICT := -std=gnu11 -Wall -Wextra -Werror -O3 -fno-trapping-math

.PHONY: demo test test-c system-deps lint dist-check sdist-check test-all-pythons bench fuzz clean
.PHONY: FORCE

# An interpreter as these rules name it: its major.minor and its real path, so python3,
# python3.11 and pyenv's 3.11.7/bin/python are one, and a venv's python is the one that made it.
WHICH_PYTHON := import os, sys; print("%d.%d" % sys.version_info[:2], os.path.realpath(sys.executable))

# $(PYTHON), asked once: which interpreter it is, and "outer-pip" when its own pip can install
# into another environment (pip 22.3+: --python). Then the venv is made without a pip of its
# own and that pip installs into it: ensurepip alone took about 4 s of a first `make demo`
# here, and byte-compiling numpy at install (--no-compile: Python compiles what it imports,
# once) 2-3 s more. Else the standard venv and its pip.
PYTHON_FACTS := $(shell $(PYTHON) -c '$(WHICH_PYTHON); import pip; sys.exit(tuple(int(p) for p in pip.__version__.split(".")[:2]) < (22, 3))' 2>/dev/null && echo outer-pip)
PYTHON_ID := $(filter-out outer-pip,$(PYTHON_FACTS))
OUTER_PIP := $(filter outer-pip,$(PYTHON_FACTS))
PIP := $(if $(OUTER_PIP),$(PYTHON) -m pip --python $(PY),$(PY) -m pip)
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check
NEEDS_PYTHON = $(if $(PYTHON_ID),,$(error PYTHON=$(PYTHON) does not run))
VENV_OWN_PIP := $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --default-pip >/dev/null

# Which interpreter made $(VENV). When PYTHON names another one (`make test PYTHON=python3.13`
# after a `make test`), the venv is removed, and the rules below make it again with that one.
# The same one costs nothing: the record is read here (no process started), its rule runs only
# when it differs, and only a rewritten record is newer than the steps that depend on it. A
# venv from before the record (none yet) is asked once which interpreter it runs on, and its
# record is dated as the venv.
MADE_BY := $(VENV)/.made-by
ifneq ($(file <$(MADE_BY)),$(PYTHON_ID))
$(MADE_BY): FORCE
endif
$(MADE_BY):
	$(NEEDS_PYTHON)
	@made_by=$$(cat $@ 2>/dev/null || $(PY) -c '$(WHICH_PYTHON)' 2>/dev/null); \
	if [ "$$made_by" = "$(PYTHON_ID)" ]; then \
	  echo "$$made_by" >$@ && touch -r $(VENV)/pyvenv.cfg $@; \
	else \
	  if [ -n "$$made_by" ]; then \
	    echo "$(VENV) was made by Python $$made_by; making it again with $(PYTHON_ID)"; fi; \
	  rm -rf $(VENV) && mkdir -p $(VENV) && echo "$(PYTHON_ID)" >$@; \
	fi

FORCE:

# The library alone (what the demo needs), then the test, benchmark and dev tools on top,
# and a pip of the venv's own (the packaging tests and `python -m build` run it).
$(RUNTIME): $(SOURCES) $(MADE_BY)
	test -x $(PY) || $(PYTHON) -m venv $(if $(OUTER_PIP),--without-pip) $(VENV)
	$(if $(OUTER_PIP),,$(VENV_OWN_PIP))
	$(PIP_INSTALL) --no-compile -e .
	touch $@

$(STAMP): $(RUNTIME)
	$(VENV_OWN_PIP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,bench,dev]'
	touch $@

demo: $(RUNTIME)
	$(PY) -m luna_shm demo

# sox is a test oracle from Debian's packages: installed here when we are root.
system-deps:
	@command -v sox >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sox >/dev/null; \
	  else echo "note: sox is not installed; the tests that use it will be skipped"; fi; }

# Our C must compile with no warnings at all, also without memfd and O_TMPFILE (the
# fallbacks a platform without them builds).
test-c:
	@for f in csrc/*.c; do $(CC) $(CFLAGS_STRICT) -Icsrc -c $$f -o /dev/null || exit 1; done
	@for f in csrc/*.c; do $(CC) $(CFLAGS_STRICT) -DLUNA_NO_MEMFD -DLUNA_NO_O_TMPFILE -Icsrc \
	  -c $$f -o /dev/null || exit 1; done
	@echo "C layer: no warnings with $(CFLAGS_STRICT), with and without memfd/O_TMPFILE"

# Lint and type-check the package, then the whole suite with Python's dev mode on
# (ResourceWarnings and other leaks show up as errors).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples benchmarks csrc/build.py setup.py
	$(VENV)/bin/mypy

test: $(STAMP) system-deps test-c lint dist-check
	PYTHONDEVMODE=1 $(PY) -m pytest

# What a user installs: the sdist, the wheel built from it (tagged abi3: one wheel for
# CPython 3.11 and later), installed into a clean venv for each CPython 3.11+ found here,
# and used from outside the checkout. The interpreters: $(PYTHON), then a 3.11, a 3.12 and a
# 3.13 (pythonX.Y on PATH, else pyenv's), each once whatever PYTHON is (an interpreter is its
# real path). Looked up only by the targets that use them: each probe starts an interpreter.
DIST_PYTHONS = $(NEEDS_PYTHON)$(shell { echo '$(PYTHON_ID)'; for v in 3.11 3.12 3.13; do \
    for c in python$$v $$HOME/.pyenv/versions/$$v*/bin/python; do \
      $$c -c '$(WHICH_PYTHON)' 2>/dev/null && break; done; done; } | awk '!seen[$$2]++ { print $$2 }')
dist-check: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist . >/dev/null
	@ls dist/*.tar.gz >/dev/null && ls dist/*-cp311-abi3-*.whl >/dev/null || \
	  { echo "dist-check: expected an sdist and a cp311-abi3 wheel, got: $$(ls dist)" >&2; exit 1; }
	@for py in $(DIST_PYTHONS); do \
	  rm -rf .venv-dist && $$py -m venv .venv-dist && \
	  .venv-dist/bin/pip install --quiet --disable-pip-version-check dist/*.whl && \
	  (cd / && $(CURDIR)/.venv-dist/bin/python $(CURDIR)/tests/smoke_installed.py) || exit 1; \
	done; rm -rf .venv-dist

# The whole suite on each other CPython that dist-check finds (not part of make test: about
# 15 min a version here), each from its own venv (.venv-3.12 and .venv-3.13; .venv-3.11 and
# .venv-3.12 with PYTHON=python3.13), built by the same rules as $(VENV); the editable installs
# share one abi3 extension.
test-all-pythons:
	@for py in $(wordlist 2,9,$(DIST_PYTHONS)); do \
	  v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])') && \
	  $(MAKE) --no-print-directory PYTHON=$$py VENV=.venv-$$v .venv-$$v/.installed && \
	  echo "== the suite on $$($$py -VV | head -1)" && \
	  PYTHONDEVMODE=1 .venv-$$v/bin/python -m pytest -q || exit 1; \
	done

# What a packager does (not part of make test: it runs the suite a second time): unpack the
# sdist in a fresh folder, `pip install '.[test]'` there (not editable) and run pytest in it.
SDIST_DIR ?= $(CURDIR)/build/sdist-check
sdist-check: $(STAMP)
	rm -rf dist $(SDIST_DIR) && mkdir -p $(SDIST_DIR)
	$(PY) -m build --sdist --outdir dist . >/dev/null
	tar xzf dist/*.tar.gz -C $(SDIST_DIR)
	$(PYTHON) -m venv $(SDIST_DIR)/venv
	cd $(SDIST_DIR)/luna_shm-* && $(SDIST_DIR)/venv/bin/pip install --quiet \
	  --disable-pip-version-check '.[test]' && $(SDIST_DIR)/venv/bin/python -m pytest -q

# make bench: the side-by-side benchmarks of benchmarks/ (never part of make test), then
# bench-report/report.md and bench-report/size_scaling.png from their JSON. The report is
# written even when test_target.py fails; the exit code is pytest's.
bench: $(STAMP)
	@mkdir -p bench-report
	$(PY) benchmarks/floors.py
	$(PY) -m pytest benchmarks --benchmark-json=bench-report/benchmarks.json \
	  --benchmark-sort=name --benchmark-columns=median,iqr,min,max,rounds; \
	status=$$?; \
	$(PY) benchmarks/report.py bench-report/benchmarks.json bench-report || status=1; \
	exit $$status

# Coverage-guided fuzzing of the C WAV parser: libFuzzer + ASan + UBSan for FUZZ_TIME seconds on a
# fresh copy of the seed corpus. A crash leaves its input in $(FUZZ_DIR)/artifacts/ and fails the
# target: copy it into tests/data/corpus/ (keep its crash-<sha1> name); tests/test_wav_parser.py
# runs every file there from then on.
FUZZ_TIME ?= 60
FUZZ_DIR ?= build/fuzz
FUZZ_CFLAGS := -std=gnu11 -Wall -Wextra -g -O1 -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all

fuzz:
	@command -v clang >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang >/dev/null; \
	  else echo "fuzz: clang is required (apt-get install clang)" >&2; exit 1; fi; }
	rm -rf $(FUZZ_DIR)/corpus
	mkdir -p $(FUZZ_DIR)/corpus $(FUZZ_DIR)/artifacts
	cp tests/data/corpus/* $(FUZZ_DIR)/corpus/
	TMPDIR=$(abspath $(FUZZ_DIR)) clang $(FUZZ_CFLAGS) -Icsrc tests/c/fuzz_wav_parser.c \
	  $(wildcard csrc/*.c) -o $(FUZZ_DIR)/fuzz_wav_parser
	cd $(FUZZ_DIR) && TMPDIR=$(abspath $(FUZZ_DIR)) ./fuzz_wav_parser -max_total_time=$(FUZZ_TIME) \
	  -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	  -artifact_prefix=artifacts/ corpus

clean:
	rm -rf $(VENV) .venv-dist .venv-3.* build dist *.egg-info src/luna_shm/_native*.so src/luna_shm/_native.c \
	  .pytest_cache .hypothesis .benchmarks benchmarks/_luna_floors* benchmarks/build
