"""A failed system call at every system call of each operation, and what each failure does.

The same zygote, dry run and recording as the kill sweep (``syscall_sweep.py``); each
round, instead of killing the child, makes the k-th call of one name fail
(``-e inject=<name>:error=<ERRNO>:when=<k>``: the call does not run and returns the
errno) and lets the child go on. The child runs the operation, then the same operation
again with nothing injected, and reports both outcomes and its open fds (see
``syscall_sweep``). Per round the test requires:

- the child exited 0 (no crash; a hang ends it with SIGALRM after 60 s);
- the injection happened inside the operation (strace's log shows ``INJECTED`` before
  the end marker);
- the outcome is ok, or a documented error: an ``OSError`` (a subclass too:
  ``TimeoutError``...) with its errno and, where a file is involved (every operation
  but the socket hand-off), its filename set; or a ``WavError``. The documented
  fallback from the RAM disk to the disk temp dir is an ok;
- the run again succeeded (a failure must not poison the process: a pool's lock, the
  prefault reserve, the placement, a cache's lock state), and gave the audio;
- no fd leaked: the open fds after the operation, and after the run again, are those
  before (for the buffer from the prefault reserve, whose thread opens and closes files
  of its own, only the last listing, taken once the reserve is turned off, against one
  taken before it was turned on);
- both dirs hold only what a finished operation publishes: an operation that raised
  left no new file of ours under a final name (a ``WavWriter``'s stream excepted: its
  file stays a valid WAV of the whole chunks before the failure, as documented), one
  that succeeded exactly its one file, whole; every file there before is unchanged,
  a replaced one holds its old content or the new; a remover that raised left no file
  under a hidden name of its own (it gives a file it moved aside its name back); the
  hidden leftovers go with the documented cleaner (``clean``; a new ``AudioCache``, for
  a cache, which must agree with its files and give a miss or the exact audio).

The errno is that of the call's family (:data:`ERRNOS`). Calls not injected, and why:

- ``close``: Linux frees the fd even when close fails; an injected failure skips the
  call and so leaks the fd for real, which no real failure does. ``munmap``: likewise,
  the mapping stays. ``brk``: the kernel never fails it with an errno (it returns the
  old break), and glibc would take an injected -ENOMEM for the new break.
- ``futex``: a lock wait, whose count depends on how the threads met (as in the kill
  sweep); ``access``/``faccessat2``: the markers.
- ``getpid``, ``gettid``, ``getuid``, ``geteuid``, ``getgid``, ``getegid``, ``getppid``,
  ``rt_sigprocmask``, ``sched_getaffinity``...: calls that cannot fail as called (glibc
  returns their value as it is: an injected -EIO becomes pid -5; ``sysinfo``, which
  fails only for a bad pointer, and whose failure glibc's ``sysconf(_SC_PHYS_PAGES)``
  does not check, giving a size made of whatever was on the stack; ``getrandom``, whose
  ``EINTR`` Python retries), listed in :data:`NEVER_FAIL`.

Every recorded call is a round (no sampling): 1 to 99 calls an operation, 574 rounds in
all, about 55 s on the project's shared 2-core machine (load 3.4).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from luna_shm import write_wav
from syscall_sweep import (
    AUDIO,
    ENCODED,
    END,
    FRAMES,
    MARKER_CALLS,
    OLD,
    PARTIAL,
    SPILL_MAX_BYTES,
    check_cache,
    clean,
    files_in,
    is_prefix_of_whole_chunks,
    read_both,
    recorded_points,
    strace_path,
    zygote,
)

# The errno each family's injected failure returns: the one its real failures give
# most often, so that each round is a failure that a real machine makes.
_FAMILIES: dict[str, tuple[str, ...]] = {
    # Calls that make an fd: the fd table is full.
    "EMFILE": ("open", "openat", "memfd_create", "inotify_init1", "socket", "socketpair",
               "dup", "dup2", "dup3", "pipe2", "accept4"),
    # Calls that write or reserve file space: the disk is full.
    "ENOSPC": ("write", "writev", "pwrite64", "pwritev", "pwritev2", "fallocate",
               "ftruncate", "sendfile", "copy_file_range"),
    # Calls that read: the device failed.
    "EIO": ("read", "readv", "pread64", "preadv", "preadv2"),
    # Calls that map memory: no memory (or too many mappings).
    "ENOMEM": ("mmap", "mremap"),
    # flock fails with EINTR, ENOLCK or EWOULDBLOCK; ENOLCK is the one no caller expects
    # (EINTR is retried or raised by a signal handler, EWOULDBLOCK means "held").
    "ENOLCK": ("flock",),
    # Calls that change names: the file system is read-only (remounted under us).
    "EROFS": ("link", "linkat", "rename", "renameat", "renameat2", "unlink", "unlinkat",
              "mkdir", "mkdirat", "rmdir", "symlink", "symlinkat"),
}
ERRNOS = {name: errno_name for errno_name, names in _FAMILIES.items() for name in names}
# Everything else (fstat, newfstatat, statx, getdents64, fcntl, ioctl, lseek, fstatfs,
# sendmsg, recvmsg, utimensat, fchmod, getrandom, madvise...) fails with EIO.
OTHER_ERRNO = "EIO"

# See the module docstring.
NOT_INJECTED = frozenset({"close", "munmap", "brk", "futex", *MARKER_CALLS})
NEVER_FAIL = frozenset({"getpid", "gettid", "getppid", "getuid", "geteuid", "getgid",
                        "getegid", "rt_sigprocmask", "sched_getaffinity", "sched_yield",
                        "exit", "exit_group", "rt_sigreturn", "getrandom", "sysinfo"})

PRODUCERS = {"write_wav-new": "wav", "get_temp_audio_path-create": "empty",
             "save_temp_audio": "mp3", "save_temp_audio-stream": "mp3",
             "WavWriter": "stream", "create_wav_buffer": "buffer",
             "create_wav_buffer-prefaulted": "buffer"}
REMOVERS = ("cleanup_all_temp_audio", "cleanup_temp_audio")
SPILLING = ("AudioCache.put-spilling", "AudioCache.get-disk")


# Calls whose failure has no file to name: the hand-off's calls on its socket (a failure
# of any other call, on the file whose fd came, names that file), and the making of an
# anonymous file (its /proc/<pid>/fd/<n> path, which later errors name, does not exist).
NAMELESS_CALLS = ("sendmsg", "recvmsg", "memfd_create")
# The same, for one operation only (the calls name files in others): the hand-off's
# receive reads its socket's SO_RCVTIMEO and waits on it with poll before its recvmsg.
NAMELESS_IN = {"send_wav-recv_wav": ("getsockopt", "poll")}


def _outcome_problems(op: str, report: dict[str, Any], inject: tuple[str, int] | None
                      ) -> list[str]:
    """What is wrong with the outcomes the child reported."""
    problems = []
    first, again = report["outcome"], report["again"]
    if not first["ok"]:
        types = first["types"]
        nameless = inject is not None and (inject[0] in NAMELESS_CALLS
                                           or inject[0] in NAMELESS_IN.get(op, ()))
        documented = "WavError" in types or ("OSError" in types and first["errno"] is not None
                                            and (first["filename"] != "None" or nameless))
        if not documented:
            problems.append(f"raised {types[0]} (errno {first['errno']}, filename "
                            f"{first['filename']}): {first['text']} at {first['where']}")
    elif op in ("AudioCache.get", "AudioCache.get-disk") and first["result"] not in ("hit", "miss"):
        problems.append(f"get gave {first['result']}")
    if not again["ok"]:
        problems.append(f"the run again raised {again['types'][0]}: {again['text']}")
    elif (op == "cleanup_temp_audio" and again["result"] is not True) or (
            op in ("AudioCache.get", "AudioCache.get-disk") and again["result"] != "hit"):
        problems.append(f"the run again gave {again['result']}")
    if op != "create_wav_buffer-prefaulted" and report["fds_after"] != report["fds_before"]:
        problems.append(f"fds before {report['fds_before']}, after {report['fds_after']}")
    if report["fds_end"] != report["fds_before"]:
        problems.append(f"fds before {report['fds_before']}, after the run again "
                        f"{report['fds_end']}")
    return problems


def _finals(directory: Path) -> set[str]:
    return {n for n in files_in(directory) if not PARTIAL.fullmatch(n)}


def _new_file_problem(op: str, outcome: dict[str, Any], path: Path, directory: Path
                      ) -> str | None:
    """What is wrong with a file the operation left under a new final name (path, the
    child's copy of the file it left in directory)."""
    ok = outcome["ok"]
    if op == "AudioPool" and not ok and outcome["filename"] in (
            str(directory / path.name), str(directory)):
        # A slot file that close() could not remove (the error names it, or its
        # directory): the next pool reclaims it (``clean``).
        return None
    kind = PRODUCERS.get(op)
    if kind is None:
        return f"a new file {path.name}"
    if not ok and kind != "stream":
        return f"it raised, and left {path.name}"
    if kind == "empty":
        return None if path.stat().st_size == 0 else f"{path.name} is not empty"
    if kind == "mp3":
        return None if path.read_bytes() == ENCODED else f"{path.name} is not the whole file"
    data = read_both(path)
    if kind == "stream":
        good = np.array_equal(data, AUDIO) if ok else is_prefix_of_whole_chunks(data)
    elif kind == "buffer":
        good = np.array_equal(data, AUDIO)
    else:
        good = np.array_equal(data, AUDIO)
    return None if good else f"{path.name} holds {len(data)} frames it was never given"


def _replaced_is_old_or_new(op: str, data: np.ndarray) -> bool:
    if np.array_equal(data, OLD) or np.array_equal(data, AUDIO):
        return True
    if op.startswith("WavWriter"):
        return is_prefix_of_whole_chunks(data)
    return op.startswith("create_wav_buffer") and len(data) == FRAMES and not data.any()


def _dir_problems(op: str, report: dict[str, Any], snapshots: Path, target: Path,
                  dirs: dict[str, Path]) -> list[str]:
    """What the operation left under final names (the child's copies of the dirs made
    before and after it) that it should not have."""
    ok = report["outcome"]["ok"]
    problems: list[str] = []
    new_files, gone = [], []
    for side, directory in dirs.items():
        before, after = snapshots / "before" / side, snapshots / "after" / side
        for name in sorted(_finals(after) - _finals(before)):
            new_files.append((after / name, directory))
        gone += sorted(_finals(before) - _finals(after))
        for name in sorted(_finals(before) & _finals(after)):
            if name == target.name and op.endswith("-replace"):
                if not _replaced_is_old_or_new(op, read_both(after / name)):
                    problems.append(f"{name}: a mix of old and new")
            elif (before / name).read_bytes() != (after / name).read_bytes():
                problems.append(f"{name} changed")
    for path, directory in new_files:
        problem = _new_file_problem(op, report["outcome"], path, directory)
        if problem:
            problems.append(problem)
    if op == "AudioPool" and len(new_files) > 1:  # one failed removal stops no other
        problems.append(f"{len(new_files)} slot files left")
    if op in PRODUCERS and ok and len(new_files) != 1:
        problems.append(f"{len(new_files)} new files for one that succeeded")
    # A remover that raised may have removed the file (the caller asked for it gone),
    # but never left it under a hidden name of its own: a failed removal gives the
    # file its name back.
    for side in dirs:
        before, after = snapshots / "before" / side, snapshots / "after" / side
        hidden = set(files_in(after)) - set(files_in(before)) - _finals(after)
        if op in REMOVERS and hidden:
            problems.append(f"it left {sorted(hidden)} hidden")
    removed = report["outcome"].get("result") in (True, 1)
    if op in REMOVERS and ok and removed != bool(gone):
        problems.append(f"said {report['outcome']['result']}, removed {gone}")
    elif gone and op not in REMOVERS:
        problems.append(f"{gone} gone")
    return problems


def _round(server: Any, op: str, strace: list[str], inject: tuple[str, int] | None,
           dirs: tuple[Path, Path, Path, Path, Path | None]) -> list[str]:
    """One round of op (inject: the (call, k) that fails, or None for the dry run), its
    checks, and the cleaner; returns what went wrong."""
    ram, fallback, target, snapshots, disk = dirs
    shutil.rmtree(snapshots, ignore_errors=True)
    snapshots.mkdir()
    if op.endswith("-replace"):
        write_wav(target, OLD, 8000)
    status, report = server.round(op, strace, mode="error")
    if os.waitstatus_to_exitcode(status) != 0 or report is None:
        return [f"the child ended with status {os.waitstatus_to_exitcode(status)}"]
    problems = _outcome_problems(op, report, inject)
    try:
        problems += _dir_problems(op, report, snapshots, target,
                                  {"ram": ram, "fallback": fallback})
        if op.startswith("AudioCache"):
            check_cache(ram, disk, SPILL_MAX_BYTES if disk else 1 << 20)
        clean(op, ram, fallback, target, disk)
    except (AssertionError, OSError, ValueError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    if target.exists():
        target.unlink()
    return problems


OPERATIONS = ["write_wav-new", "write_wav-atomic-replace", "write_wav-plain-replace",
              "save_temp_audio", "save_temp_audio-stream", "WavWriter", "WavWriter-replace",
              "create_wav_buffer", "create_wav_buffer-replace", "create_wav_buffer-prefaulted",
              "AudioPool", "cleanup_all_temp_audio", "AudioCache.put", "AudioCache.put-spilling",
              "AudioCache.get_or_render", "read_wav", "read_wav-copy", "follow_wav",
              "send_wav-recv_wav", "cleanup_temp_audio", "AudioCache.get", "AudioCache.get-disk",
              "get_temp_audio_path-create", "create_wav_buffer-anonymous", "read_wav-float32",
              "AudioPool-anonymous"]

# Operations with rows that fail today, and why (strict: a fix makes the test say so).
KNOWN: dict[str, str] = {}  # operation -> why its rows fail (a strict xfail)


def _marked(op: str) -> Any:
    if op in KNOWN:
        return pytest.param(op, marks=pytest.mark.xfail(reason=KNOWN[op], strict=True))
    return op


_INJECTED = re.compile(r"= -1 E[A-Z]+ \(.*\) \(INJECTED\)")


@pytest.mark.parametrize("op", [_marked(op) for op in OPERATIONS])
def test_a_failed_system_call_anywhere_raises_a_documented_error_and_leaves_nothing_behind(
        private_dirs, tmp_path, op) -> None:
    strace = strace_path()
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    target = ram / "given.wav"
    log = tmp_path / "strace.log"
    disk_dir = tmp_path / "disk"  # the cache's disk tier, for the ops that use it
    disk_dir.mkdir()
    disk = disk_dir if op in SPILLING else None
    dirs = (ram, fallback, target, tmp_path / "snapshots", disk)
    with zygote(target, disk_dir, tmp_path / "snapshots") as server:
        problems = _round(server, op, [strace, "-f", "-o", str(log), "-e", "trace=all",
                                       "-e", "signal=none"], None, dirs)
        assert problems == [], f"the dry run: {problems}"
        points = [(name, nth) for name, nth in recorded_points(log.read_text())
                  if name not in NOT_INJECTED | NEVER_FAIL]
        failures = []
        for name, nth in points:
            errno_name = ERRNOS.get(name, OTHER_ERRNO)
            assert hasattr(errno, errno_name)
            # No -f: the operation's thread alone is traced, so that no other thread's
            # call of the same name comes first. The markers are traced too, to see that
            # the failure fell inside the operation.
            problems = _round(server, op, [
                strace, "-o", str(log), "-e", f"trace={name},{','.join(MARKER_CALLS)}",
                "-e", "signal=none", "-e", f"inject={name}:error={errno_name}:when={nth}"],
                (name, nth), dirs)
            trace = log.read_text()
            injected = _INJECTED.search(trace)
            if injected is None or END in trace[:injected.start()]:
                problems.append("the failure did not fall inside the operation")
            if problems:
                failures.append(f"{errno_name} at call {nth} of {name} "
                                f"({points.index((name, nth)) + 1} of {len(points)}): "
                                + "; ".join(problems))
        assert failures == [], f"{len(failures)} of {len(points)} rounds:\n" + "\n".join(
            failures)


# The operations whose last call is the close of the new file they named: a close that
# fails there (EIO, ENOSPC: a network file system reports a lost write at the close) may
# have lost what was written.
CLOSED_LAST = ["write_wav-new", "save_temp_audio", "save_temp_audio-stream"]


@pytest.mark.parametrize("op", CLOSED_LAST)
def test_a_new_file_whose_close_fails_is_removed_and_the_error_names_it(
        private_dirs, tmp_path, op) -> None:
    # close is not in the sweep: an injected failure skips the call, so the fd stays open,
    # which no real failure does (Linux frees it). Here only what a real failed close
    # shows is checked: the error, and that no file is left under the name.
    strace = strace_path()
    ram, fallback = Path(private_dirs.ram), Path(private_dirs.fallback)
    log, snapshots = tmp_path / "strace.log", tmp_path / "snapshots"
    with zygote(ram / "given.wav", tmp_path, snapshots) as server:
        snapshots.mkdir()
        server.round(op, [strace, "-f", "-o", str(log), "-e", "trace=all", "-e",
                          "signal=none"], mode="error")
        closes = [nth for name, nth in recorded_points(log.read_text()) if name == "close"]
        assert closes, "the dry run recorded no close"
        shutil.rmtree(snapshots)  # the dry run's, and the file it made
        snapshots.mkdir()
        for path in (*ram.iterdir(), *fallback.iterdir()):
            path.unlink()
        status, report = server.round(op, [
            strace, "-o", str(log), "-e", f"trace=close,{','.join(MARKER_CALLS)}",
            "-e", "signal=none", "-e", f"inject=close:error=EIO:when={closes[-1]}"],
            mode="error")
    assert os.waitstatus_to_exitcode(status) == 0 and report is not None
    assert "(INJECTED)" in log.read_text()
    first = report["outcome"]
    assert not first["ok"] and first["errno"] == errno.EIO, first
    named = Path(first["filename"])
    assert named.parent == ram and re.fullmatch(r"luna_audio_[0-9a-f]{32}\.(wav|mp3)",
                                                named.name), first
    assert files_in(snapshots / "after" / "ram") == []  # removed, not left half-written
    assert files_in(snapshots / "after" / "fallback") == []
    assert report["again"]["ok"], report["again"]
