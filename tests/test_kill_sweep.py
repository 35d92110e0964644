"""SIGKILL at every system call of each producer, and what each kill leaves behind.

A zygote process (``syscall_sweep.py``, shared with the error sweep) imports luna_shm
and numpy once and forks one child per round; the child runs ONE operation between two
marker calls, and a dry run under ``strace -f`` records every system call of it. Each
later round kills the child at one entry of that recording:
``-e inject=<name>:signal=SIGKILL:when=<k>`` for the k-th call of that name, delivered on
entry, so that call never runs: "every call before it finished, it did not run".
Every call after the begin marker up to the end marker itself (the operation complete)
gets its round, none sampled, and every round must end with the child killed by
SIGKILL: the call came again at the same place, so the rounds cover the recording.
After each kill the test checks what is visible under each name (``_check``), runs the
documented cleaner (``_clean``), and requires both private dirs to hold nothing of ours.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from luna_shm import write_wav
from syscall_sweep import (
    AUDIO,
    ENCODED,
    FRAMES,
    KEY,
    OLD,
    PARTIAL,
    SLOT,
    SPILL_MAX_BYTES,
    TEMP_WAV,
    cache_dir,
    check_cache,
    clean,
    files_in,
    is_prefix_of_whole_chunks,
    read_both,
    recorded_points,
    strace_path,
    zygote,
)


def _check_temp_wav(ram: Path, allowed: Callable[[np.ndarray], bool]) -> None:
    """Every temp WAV name shows a whole WAV whose samples allowed() accepts (never an
    empty or headerless file: the name appears once the file is one); nothing else
    but our hidden partials."""
    for name in files_in(ram):
        if PARTIAL.fullmatch(name):
            continue
        assert TEMP_WAV.fullmatch(name), f"an unexpected file {name}"
        assert allowed(read_both(ram / name)), f"{name} holds audio it was never given"


def _check(op: str, ram: Path, target: Path, disk: Path | None) -> None:
    """Invariant 1 (and 3 for a replaced file): what is visible under a name after the kill."""
    if op in ("write_wav-new", "cleanup_all_temp_audio"):
        _check_temp_wav(ram, lambda data: np.array_equal(data, AUDIO))
    elif op.endswith("-replace"):
        data = read_both(target)
        if op.startswith("WavWriter"):
            assert np.array_equal(data, OLD) or is_prefix_of_whole_chunks(data), (
                "a mix of old and new")
        elif op.startswith("create_wav_buffer"):
            assert np.array_equal(data, OLD) or (len(data) == FRAMES and (
                np.array_equal(data, AUDIO) or not data.any())), "a mix of old and new"
        else:
            assert np.array_equal(data, OLD) or np.array_equal(data, AUDIO), (
                "a mix of old and new")
        assert all(PARTIAL.fullmatch(n) for n in files_in(ram) if n != target.name)
    elif op.startswith("save_temp_audio"):
        for name in files_in(ram):
            assert re.fullmatch(r"luna_audio_[0-9a-f]{32}\.mp3", name), name
            assert (ram / name).read_bytes() == ENCODED, f"{name} is not the whole file"
    elif op == "WavWriter":
        _check_temp_wav(ram, is_prefix_of_whole_chunks)
    elif op.startswith("create_wav_buffer"):
        _check_temp_wav(ram, lambda data: len(data) == FRAMES and (
            np.array_equal(data, AUDIO) or not data.any()))
    elif op == "AudioPool":
        for name in files_in(ram):
            if PARTIAL.fullmatch(name):  # a slot on its way out (see cleanup_temp_audio)
                continue
            assert SLOT.fullmatch(name), f"an unexpected file {name}"
            data = read_both(ram / name, None)
            assert len(data) == 0 or np.array_equal(data, AUDIO), f"{name}: {len(data)} frames"
    else:
        check_cache(ram, disk, SPILL_MAX_BYTES if disk else 1 << 20)


OPERATIONS = ["write_wav-new", "write_wav-atomic-replace",
              "write_wav-plain-replace", "save_temp_audio", "save_temp_audio-stream",
              "WavWriter", "WavWriter-replace", "create_wav_buffer", "create_wav_buffer-replace",
              "create_wav_buffer-prefaulted",
              "AudioPool", "cleanup_all_temp_audio", "AudioCache.put", "AudioCache.put-spilling",
              "AudioCache.get_or_render"]


@pytest.mark.parametrize("op", OPERATIONS)
def test_sigkill_at_every_system_call_leaves_only_whole_files_and_cleanable_leftovers(
        private_dirs, tmp_path, op) -> None:
    strace = strace_path()
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    target = ram / "given.wav"
    replaces = op.endswith("-replace")
    log = tmp_path / "dry-run.strace"
    disk_dir = tmp_path / "disk"  # the cache's disk tier, for the op that spills to it
    disk_dir.mkdir()
    disk = disk_dir if op.endswith("-spilling") else None
    with zygote(target, disk_dir) as server:
        if replaces:
            write_wav(target, OLD, 8000)
        status, _ = server.round(op, [strace, "-f", "-o", str(log), "-e", "trace=all",
                                   "-e", "signal=none"])
        assert os.waitstatus_to_exitcode(status) == 0, "the dry run failed"
        points = recorded_points(log.read_text())
        if disk is not None:  # the operation did spill: its kills fall inside a spill
            assert (cache_dir(disk) / f"{KEY}.wav").is_file()
        _check(op, ram, target, disk)
        clean(op, ram, fallback, target, disk)
        for name, nth in points:
            if replaces:
                write_wav(target, OLD, 8000)
            # No -f: the operation's thread alone is traced, so that no other thread's
            # call of the same name comes first.
            status, _ = server.round(op, [strace, "-o", "/dev/null", "-e", f"trace={name}",
                                       "-e", "signal=none",
                                       "-e", f"inject={name}:signal=SIGKILL:when={nth}"])
            assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, (
                f"call {nth} of {name} did not come again: the operation did not repeat")
            try:
                _check(op, ram, target, disk)
                clean(op, ram, fallback, target, disk)
            except (AssertionError, OSError, ValueError) as exc:
                raise AssertionError(f"killed at call {nth} of {name} "
                                     f"({points.index((name, nth)) + 1} of {len(points)}): "
                                     f"{exc}") from None
            if replaces:
                target.unlink()
