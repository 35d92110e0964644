"""Shared test helpers: private RAM dirs, private mount namespaces, capability probes."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# Where the luna_shm under test was imported from: the checkout (an editable install, the
# extension built in place) or site-packages (pytest run in an unpacked sdist after
# `pip install .`). Child processes get it as PYTHONPATH, so they test the same copy.
LIBRARY_PATH = str(Path(__import__("luna_shm").__file__).resolve().parent.parent)

# What python-soundfile returns for each of our sample types, and sox's name for the encoding.
SOUNDFILE_DTYPE = {"uint8": "int16", "int16": "int16", "int32": "int32",
                   "float32": "float32", "float64": "float64"}
SOX_ENCODING = {"uint8": "unsigned-integer", "int16": "signed-integer",
                "int32": "signed-integer", "float32": "floating-point",
                "float64": "floating-point"}


def samples(dtype: str, frames: int, channels: int, seed: int = 0) -> np.ndarray:
    """Audio over the type's range; floats on a 2**-23 grid in [-1, 1), exact through sox."""
    rng = np.random.default_rng(seed)
    shape = (frames,) if channels == 1 else (frames, channels)
    if dtype.startswith("float"):
        return (rng.integers(-(2**23), 2**23, shape) / 2**23).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def as_soundfile_reads(luna: np.ndarray) -> np.ndarray:
    """Our uint8 samples as soundfile returns 8-bit audio (int16, 128 -> 0); others as they are."""
    if luna.dtype == np.uint8:
        return ((luna.astype(np.int16) - 128) << 8).astype(np.int16)
    return luna


def require_tool(name: str) -> str:
    """The path of an external program; skip without it (fail under CI, which installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed, but CI must have it (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


@functools.cache
def _unshare_prefix() -> list[str] | None:
    """The unshare command that gives a child a private mount namespace where it may mount."""
    if shutil.which("unshare") is None:
        return None
    candidates = [["unshare", "-m", "--propagation", "private"]]
    if os.geteuid() != 0:
        candidates = [["unshare", "-r", "-m", "--propagation", "private"]]
    probe = "mount -t tmpfs -o size=64k tmpfs /dev/shm && test -w /dev/shm"
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "sh", "-c", probe], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return None


def require_private_mounts() -> list[str]:
    """The unshare prefix; skip with the reason when private mounts are not permitted here."""
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("cannot make a private mount namespace with a tmpfs here (unshare -m)")
    return prefix


def _tmp_paths_to_keep() -> list[str]:
    """What a child needs from the machine's /tmp: the checkout and the interpreter's
    installation, as paths relative to /tmp (outermost only)."""
    needed = {REPO, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).parent}
    relative = sorted({str(path.resolve().relative_to("/tmp")) for path in needed
                       if path.resolve().is_relative_to("/tmp")})
    kept: list[str] = []
    for rel in relative:
        if not any(rel == k or rel.startswith(k + "/") for k in kept):
            kept.append(rel)
    return kept


# Top-level names under the child's private /tmp that are the checkout or the interpreter
# bound back in (see run_in_private_shm), and child code that lists /tmp without them.
KEPT_IN_TMP = sorted({rel.split("/")[0] for rel in _tmp_paths_to_keep()})
LIST_PRIVATE_TMP = f"sorted(set(os.listdir('/tmp')) - set({KEPT_IN_TMP!r}))"


def child_tmp_on_disk(disk: str | Path) -> str:
    """Child code (for run_in_private_shm) that puts the private disk dir disk at /tmp
    instead of the private tmpfs, keeping the checkout and interpreter visible."""
    return textwrap.dedent(f"""
        import os as _os, subprocess as _subprocess
        _subprocess.run(["umount", "-l", "/tmp"], check=True)
        _real_tmp = _os.open("/tmp", _os.O_RDONLY | _os.O_DIRECTORY)
        _subprocess.run(["mount", "--bind", {str(disk)!r}, "/tmp"], check=True)
        for _rel in {_tmp_paths_to_keep()!r}:
            _os.makedirs("/tmp/" + _rel, exist_ok=True)
            _subprocess.run(["mount", "--no-canonicalize", "--bind",
                             f"/proc/self/fd/{{_real_tmp}}/{{_rel}}", "/tmp/" + _rel],
                            check=True, pass_fds=[_real_tmp])
        _os.close(_real_tmp)
    """)


def child_take_every_inode(nr_inodes: int) -> str:
    """Child code (for run_in_private_shm) that remounts the child's private /dev/shm with
    nr_inodes inodes and takes every one left with empty files (/dev/shm/filler<n>): a new
    file there then fails with ENOSPC however many bytes are free."""
    return textwrap.dedent(f"""
        import errno as _errno, os as _os, subprocess as _subprocess
        _subprocess.run(["mount", "-o", "remount,nr_inodes={nr_inodes}", "/dev/shm"],
                        check=True)
        _fillers = 0
        try:
            while True:
                _os.close(_os.open(f"/dev/shm/filler{{_fillers}}", _os.O_CREAT | _os.O_WRONLY))
                _fillers += 1
        except OSError as _exc:
            assert _exc.errno == _errno.ENOSPC, _exc
    """)


def child_tmp_as_symlink(target: str = "/real_tmp") -> str:
    """Child code (for run_in_private_shm) that makes /tmp a symbolic link to target, a
    directory holding the child's private /tmp, as some machines have it (/tmp ->
    /private/tmp, /tmp -> /var/tmp): / cannot take a symlink in place of its /tmp, so the
    child moves into a private root (a tmpfs with every other top-level entry of / bound
    in, /tmp a link) with chroot. It must run before luna_shm is imported."""
    return textwrap.dedent(f"""
        import os as _os, subprocess as _subprocess
        _root = "/tmp/.private_root"
        _os.mkdir(_root)
        _subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", _root], check=True)
        _os.mkdir(_root + {target!r})
        # The child's private /tmp (with the checkout and interpreter bound back in).
        _subprocess.run(["mount", "--rbind", "/tmp", _root + {target!r}], check=True)
        for _entry in _os.listdir("/"):
            _source, _dest = "/" + _entry, _root + "/" + _entry
            if _entry == "tmp" or _os.path.lexists(_dest):
                continue
            if _os.path.islink(_source):
                _os.symlink(_os.readlink(_source), _dest)
            elif _os.path.isdir(_source):
                _os.mkdir(_dest)
                _subprocess.run(["mount", "--rbind", _source, _dest], check=True)
        _os.symlink({target!r}, _root + "/tmp")
        _os.chroot(_root)
        _os.chdir("/")
    """)


def run_in_private_shm(
    body: str,
    *,
    shm_size: str = "1m",
    read_only: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run python code in a child whose /dev/shm and /tmp are fresh private tmpfs mounts.

    /dev/shm is a tmpfs of shm_size (mounted read-only with read_only=True);
    /tmp is a private tmpfs too, so nothing the child does can touch the
    machine's shared /dev/shm or /tmp. Returns the finished process (text output).
    """
    prefix = require_private_mounts()
    shm_options = f"size={shm_size},mode=1777" + (",ro" if read_only else "")
    # A checkout or interpreter that lives under /tmp (a clone in /tmp, a venv in
    # it) would vanish under the private /tmp: each is bound back into it, read
    # through fd 9, which still holds the machine's /tmp open (--no-canonicalize: mount
    # would otherwise resolve that path to its name, /tmp/..., in the new tmpfs).
    rebind = "".join(
        f"mkdir -p '/tmp/{rel}'\n"
        f"mount --no-canonicalize --bind '/proc/self/fd/9/{rel}' '/tmp/{rel}'\n"
        for rel in _tmp_paths_to_keep()
    )
    script = (
        "set -e\n"
        "exec 9</tmp\n"
        f"mount -t tmpfs -o {shm_options} tmpfs /dev/shm\n"
        "mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp\n"
        f"{rebind}"
        "exec 9<&-\n"
        'exec "$0" -c "$1"\n'
    )
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("LUNA_SHM_DIR", "LUNA_SHM_DISABLE", "TMPDIR")}
    child_env.update(env or {})
    child_env["PYTHONPATH"] = LIBRARY_PATH
    return subprocess.run(
        [*prefix, "sh", "-c", script, sys.executable, textwrap.dedent(body)],
        capture_output=True, text=True, env=child_env, timeout=timeout,
    )


def assert_child_ok(done: subprocess.CompletedProcess[str]) -> str:
    """Fail with the child's output unless it exited 0; return its stdout."""
    assert done.returncode == 0, f"child exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


# Python lines for a child process: fill its fd table under a 64-fd limit, the fds in held
# (the child imports errno, os and resource).
FILL_FD_TABLE = """
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
"""


def wait_until_someone_waits_for_flock(path: str, inode: int, going_on: Callable[[], bool],
                                       deadline: float = 60) -> bool:
    """Wait until /proc/locks shows a flock of the file path (inode number inode, taken
    before the waiter starts: it may remove the file) that someone waits for (a "->"
    line): True then; False as soon as going_on() says the one expected to wait ended
    instead. Fails, instead of hanging the suite, after deadline seconds."""
    ino = f":{inode} "
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with open("/proc/locks") as locks:
            if any("->" in line and ino in line for line in locks):
                return True
        if not going_on():
            return False
        time.sleep(0.001)
    pytest.fail(f"no one came to wait for the lock of {path}")


def call_with_deadline(function: Callable[[], object], deadline: float = 60) -> object:
    """Run function in a thread and return its result; fail, instead of hanging the suite,
    if it has not returned after deadline seconds."""
    result: list[object] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(function())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(deadline)
    assert not worker.is_alive(), f"{getattr(function, '__name__', 'the call')} hung"
    if errors:
        raise errors[0]
    return result[0]


def rest_of_output(child: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """What child writes to its stdout and stderr pipes from here until it closes them,
    read through the pipes' file objects; closes the pipes (and stdin), waits for child,
    and returns (out, err): communicate() for a child a test has read a line from.

    communicate() reads the pipes' fds itself: it misses what an earlier readline() took
    into the file object's buffer with its line. A child that prints its next output
    without waiting for the test (a report after a timed wait, or at once) gets both into
    one read on a loaded machine, and communicate() returns "" for it. Both pipes are
    read at once, so a child that fills one while the test waits on the other never
    blocks. Past timeout seconds child is killed and subprocess.TimeoutExpired raised,
    with what had come by then."""
    if child.stdin is not None:
        child.stdin.close()  # as communicate() does: a child reading stdin sees its end
    streams = {name: stream for name, stream in (("out", child.stdout), ("err", child.stderr))
               if stream is not None}
    read = dict.fromkeys(("out", "err"), "")

    def drain(name: str, stream: IO[str]) -> None:
        read[name] = stream.read()

    readers = {name: threading.Thread(target=drain, args=(name, stream), daemon=True)
               for name, stream in streams.items()}
    for reader in readers.values():
        reader.start()
    end = time.monotonic() + timeout
    for reader in readers.values():
        reader.join(max(0.0, end - time.monotonic()))
    hung = any(reader.is_alive() for reader in readers.values())
    if hung:
        child.kill()
        for reader in readers.values():
            reader.join(10)  # EOF once the child is gone (unless its own children hold on)
    for name, stream in streams.items():
        if not readers[name].is_alive():  # (a close would wait for a read in progress)
            stream.close()
    try:
        child.wait(10 if hung else max(5.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:  # it closed its pipes, and goes on
        hung = True
        child.kill()
        child.wait(10)
    if hung:
        raise subprocess.TimeoutExpired(child.args, timeout, output=read["out"],
                                        stderr=read["err"])
    return read["out"], read["err"]


@contextmanager
def lock_held_by_a_stopped_process(path: str, *, shared: bool = False) -> Iterator[None]:
    """A child process takes path's flock (exclusive; shared, as a waiter of a render
    holds it for a moment, when shared) and stops itself (SIGSTOP), as a process stopped
    or hung in the middle of a commit would; the block runs once it is stopped, and the
    child is killed at the end."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, signal, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        f"fcntl.flock(fd, fcntl.{'LOCK_SH' if shared else 'LOCK_EX'})\n"
        "os.kill(os.getpid(), signal.SIGSTOP)\n"), path])
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        yield
    finally:
        holder.kill()
        holder.wait(timeout=30)


def force_first_token(monkeypatch: pytest.MonkeyPatch, first: str) -> list[str]:
    """Make luna_shm's next new name use the token first, later ones fresh tokens (a
    deterministic collision with something planted there); return the tokens handed out."""
    from luna_shm import _newfile

    real = _newfile._new_token
    given: list[str] = []

    def token() -> str:
        value = first if not given else real()
        given.append(value)
        return value

    monkeypatch.setattr(_newfile, "_new_token", token)
    return given


OTHER_UID = 65534  # "nobody": a real second user for tests that need one

# CPython 3.12+ warns (DeprecationWarning) on every fork of a process with threads. Tests
# that fork so on purpose filter that one warning (the interpreter's, not the library's):
# with -W in a child's command line, or as a mark on the test.
MULTITHREADED_FORK_IS_MEANT = "ignore:This process:DeprecationWarning"
fork_with_threads_is_meant = pytest.mark.filterwarnings(MULTITHREADED_FORK_IS_MEANT)


def as_other_user(action: Callable[..., object], *args: object) -> object:
    """Run action(*args) in a forked child that is uid 65534; return what it returned (JSON).

    Skips without root (only root can become another user).
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to fork a child that becomes uid 65534")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            os.write(write_end, json.dumps(action(*args)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(answer)


def closed_and_readable_dirs(ram: str) -> tuple[str, str]:
    """Two dirs inside the private RAM dir ram for uid 65534: one it cannot read (mode 000),
    one of its own (0700)."""
    os.chmod(ram, 0o711)  # let the other user reach the dirs below
    closed, readable = f"{ram}/closed", f"{ram}/readable"
    os.mkdir(closed, 0o000)
    os.mkdir(readable, 0o700)
    os.chown(readable, OTHER_UID, OTHER_UID)
    return closed, readable
