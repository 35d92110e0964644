"""The C layer defends itself, checked in C under AddressSanitizer + UndefinedBehaviorSanitizer.

tests/c/hostile_args.c, built with every file of csrc/ and -fsanitize=alignment (as the
library is built here, and with its fallbacks for systems without memfd and O_TMPFILE),
runs every sample converter on misaligned source and destination pointers, writes
every header wav_format.c makes and parses it back, and calls every C function that
takes a size or an offset with hostile values (UINT64_MAX, 2**63, 2**63 - 1, 2**32,
sums that wrap) on a real file in a private directory: each must answer its
documented -EFBIG or -EINVAL and leave the file and the directory as they were.
tests/c/guard_fork.c forks while another thread is inside guard.c (holding one of its
mutexes, or held in the middle of changing an entry) and checks what the child can do.
tests/c/cells_fork.c forks while threads fill, keep and empty fd cells (files.c's table
of which cell holds each fd) and checks what each child holds.
(tests/test_wav_parser.py runs the parser over the corpus in the same kind of build.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from sanitizers import SANITIZER_MARKS, build_sanitized

# The library as built here, and its fallbacks for a system with neither memfd nor
# O_TMPFILE (built on Linux too: their paths are checked the same way).
BUILDS = {"native": (), "fallbacks": ("LUNA_NO_MEMFD", "LUNA_NO_O_TMPFILE")}


@pytest.fixture(scope="module", params=BUILDS)
def hostile_args(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return build_sanitized("hostile_args.c", tmp_path_factory.mktemp("hostile_args"),
                           defines=BUILDS[request.param])


def test_c_layer_refuses_hostile_sizes_and_converts_at_any_alignment_under_sanitizers(
        hostile_args: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    binary, env = hostile_args
    victim_dir = tmp_path / "private"
    victim_dir.mkdir()
    done = subprocess.run([str(binary), "-t", str(victim_dir)], capture_output=True,
                          text=True, env=env, timeout=300)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    summary = re.fullmatch(r"(\d+) passed, (\d+) failed\n", done.stdout)
    assert summary is not None, (done.stdout, done.stderr[-4000:])
    assert summary.group(2) == "0", done.stderr[-4000:]
    assert int(summary.group(1)) > 4500  # every group of checks ran (decode.c: about 2,600)
    assert done.returncode == 0
    assert list(victim_dir.iterdir()) == []  # nothing was left behind


@pytest.fixture(scope="module")
def guard_fork(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return build_sanitized("guard_fork.c", tmp_path_factory.mktemp("guard_fork"),
                           with_csrc=False)


def test_a_child_forked_while_another_thread_holds_a_guard_mutex_still_registers(
        guard_fork: tuple[Path, dict[str, str]]) -> None:
    # tests/c/guard_fork.c: a thread holds guard.c's grow_lock (or install_lock) across
    # a real fork; the child's registration that needs it must not wait for ever.
    binary, env = guard_fork
    done = subprocess.run([str(binary), "mutexes"], capture_output=True, text=True, env=env,
                          timeout=120)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    assert (done.stdout, done.stderr, done.returncode) == ("2 passed, 0 failed\n", "", 0)


def test_a_child_forked_while_another_thread_changes_a_guard_entry_can_close_and_use_it(
        guard_fork: tuple[Path, dict[str, str]]) -> None:
    # tests/c/guard_fork.c: a thread is held (guard.c's test-only GUARD_TEST_PAUSE) inside
    # a real SIGBUS handler that is fixing an entry, inside a shrink, inside a
    # registration, and the main thread forks. The child unregisters, breaks, absorbs
    # and reads the entry (each spun for ever in settled_state, or retried the fault for
    # ever, before the child settled it at the fork), and finds the shrink done and the
    # half-made registration free. Each hung child ends by alarm() after 10 s.
    binary, env = guard_fork
    done = subprocess.run([str(binary), "entries"], capture_output=True, text=True, env=env,
                          timeout=120)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    assert (done.stdout, done.stderr, done.returncode) == ("6 passed, 0 failed\n", "", 0)


@pytest.fixture(scope="module")
def cells_fork(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    binary, env = build_sanitized("cells_fork.c", tmp_path_factory.mktemp("cells_fork"))
    # A small quarantine: the churn frees cells without pause, and a fork copies the
    # page tables of every byte ASan holds back (the default 256 MB slowed each fork
    # until the 400 took minutes). A child's own report ends it with 23, which the
    # program counts as a failure.
    options = env["ASAN_OPTIONS"] + ":quarantine_size_mb=4:exitcode=23"
    return binary, {**env, "ASAN_OPTIONS": options}


def test_threads_filling_keeping_and_emptying_cells_beside_forks_leave_children_only_kept_fds(
        cells_fork: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    # tests/c/cells_fork.c: threads fill, keep and release heap and stack cells (luna_dup,
    # luna_wav_open, luna_write_wav_path's own) and free the heap ones while the main
    # thread forks 400 children. Each child holds no copy of the churn's files but a
    # kept cell's, and its at-fork handler never touches a cell's freed memory.
    binary, env = cells_fork
    done = subprocess.run([str(binary), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-4000:]
    assert re.fullmatch(r"children 400, with a kept copy \d+\n", done.stdout)
    assert list(tmp_path.iterdir()) == []


def test_a_cell_freed_while_it_holds_its_fd_is_reported_in_the_forked_child(
        cells_fork: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    # The harness above can fail: a cell freed while still noted (a misuse: every path
    # releases before it frees) is read by the child's at-fork handler, which
    # AddressSanitizer reports.
    binary, env = cells_fork
    done = subprocess.run([str(binary), str(tmp_path), "freed"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "heap-use-after-free" in done.stderr
    assert "close_cells_in_child" in done.stderr
