"""The C layer defends itself, checked in C under AddressSanitizer + UndefinedBehaviorSanitizer.

tests/c/hostile_args.c, built with every file of csrc/ and -fsanitize=alignment,
runs every sample converter on misaligned source and destination pointers, writes
every header wav_format.c makes and parses it back, and calls every C function that
takes a size or an offset with hostile values (UINT64_MAX, 2**63, 2**63 - 1, 2**32,
sums that wrap) on a real file in a private directory: each must answer its
documented -EFBIG or -EINVAL and leave the file and the directory as they were.
(tests/test_wav_parser.py runs the parser over the corpus in the same kind of build.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from sanitizers import SANITIZER_MARKS, build_sanitized


@pytest.fixture(scope="module")
def hostile_args(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return build_sanitized("hostile_args.c", tmp_path_factory.mktemp("hostile_args"))


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


def test_a_child_forked_while_another_thread_holds_a_guard_mutex_still_registers(
        tmp_path: Path) -> None:
    # tests/c/guard_fork.c: a thread holds guard.c's grow_lock (or install_lock) across
    # a real fork; the child's registration that needs it must not wait for ever.
    binary, env = build_sanitized("guard_fork.c", tmp_path, with_csrc=False)
    done = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=120)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    assert (done.stdout, done.stderr, done.returncode) == ("2 passed, 0 failed\n", "", 0)
