"""Hostile neighbours: planted names, another user, foreign truncation, unsafe directories.

Things are planted by this (root) process and by another user: a forked child
that drops to uid 65534 and works through a directory descriptor opened before
(it cannot even look into the private dirs otherwise). That user shares a
sticky, world-writable RAM dir with us, as every user shares /dev/shm. Decoys
are hashed before and after; every call that could block runs with a deadline.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    LIBRARY_PATH,
    OTHER_UID,
    as_other_user,
    call_with_deadline,
    force_first_token,
)
from luna_shm import (
    AudioPool,
    WavWriter,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    get_temp_audio_path,
    placement,
    read_wav,
    temp_audio,
    write_wav,
)

TOKEN = "0" * 32
RATE = 8000


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def shared_ram(private_dirs, monkeypatch) -> str:
    """A sticky, world-writable RAM dir that we and uid 65534 both write into, like /dev/shm."""
    shared = f"{private_dirs.ram}/shared"
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    monkeypatch.setenv("LUNA_SHM_DIR", shared)
    placement.refresh()
    assert temp_audio.temp_dir() == shared
    return shared


# ---- planting ------------------------------------------------------------------------------


def _plant_here(dir_fd: int, name: str, kind: str, target: str) -> None:
    """Put a kind of thing at name in the directory dir_fd (run by whoever plants it)."""
    if kind in ("symlink-to-decoy", "dangling-symlink"):
        os.symlink(target, name, dir_fd=dir_fd)
    elif kind == "fifo":
        os.mkfifo(name, 0o644, dir_fd=dir_fd)
    elif kind == "directory":
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
        try:
            fd = os.open("inside.wav", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=inner)
            os.write(fd, b"keep me")
            os.close(fd)
        finally:
            os.close(inner)
    elif kind == "regular-file":
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        os.write(fd, b"theirs")
        os.close(fd)
    else:
        raise AssertionError(kind)


def _plant_as(planter: str, directory: str, name: str, kind: str, target: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if planter == "root":
            _plant_here(dir_fd, name, kind, target)
        else:
            as_other_user(_plant_here, dir_fd, name, kind, target)
    finally:
        os.close(dir_fd)


PLANTED_KINDS = ["symlink-to-decoy", "dangling-symlink", "fifo", "directory", "regular-file"]


class Planted:
    """Something planted at one of our names, and the checks that it was left alone."""

    def __init__(self, planter: str, directory: str, name: str, kind: str, outside: Path):
        self.path = f"{directory}/{name}"
        self.kind = kind
        self.uid = 0 if planter == "root" else OTHER_UID
        self.decoy = outside / "decoy.wav"
        self.decoy.write_bytes(b"precious bytes\n" * 100)
        os.chmod(self.decoy, 0o644)
        self.decoy_hash, self.decoy_mode = sha256(self.decoy), os.stat(self.decoy).st_mode
        self.target = str(self.decoy if kind == "symlink-to-decoy" else outside / "missing.wav")
        _plant_as(planter, directory, name, kind, self.target)

    def assert_untouched(self) -> None:
        st = os.lstat(self.path)
        assert st.st_uid == self.uid
        if "symlink" in self.kind:
            assert stat.S_ISLNK(st.st_mode) and os.readlink(self.path) == self.target
        elif self.kind == "fifo":
            assert stat.S_ISFIFO(st.st_mode)
        elif self.kind == "directory":
            assert stat.S_ISDIR(st.st_mode) and os.listdir(self.path) == ["inside.wav"]
            assert Path(self.path, "inside.wav").read_bytes() == b"keep me"
        else:
            assert stat.S_ISREG(st.st_mode) and Path(self.path).read_bytes() == b"theirs"
        assert sha256(self.decoy) == self.decoy_hash
        assert os.stat(self.decoy).st_mode == self.decoy_mode
        assert not os.path.lexists(Path(self.target).parent / "missing.wav")


DATA = np.arange(1000, dtype=np.int16)


def produce(kind: str) -> tuple[str, Callable[[], None]]:
    """Make a file with kind of producer; return its path and how to release it."""
    if kind == "get_temp_audio_path":
        return get_temp_audio_path(create=True), lambda: None
    if kind == "write_wav":
        return write_wav(None, DATA, RATE), lambda: None
    if kind == "create_wav_buffer":
        buf = create_wav_buffer(len(DATA), RATE)
        buf.array[:] = DATA
        return buf.path, buf.close
    if kind == "WavWriter":
        writer = WavWriter(None, RATE)
        writer.write(DATA)
        return writer.path, writer.close
    if kind == "AudioPool":
        pool = AudioPool(slots=1, max_bytes=DATA.nbytes)
        pooled = pool.write_wav(DATA, RATE)

        def release_and_close() -> None:
            pooled.release()
            pool.close()

        return pooled.path, release_and_close
    raise AssertionError(kind)


PRODUCERS = ["get_temp_audio_path", "write_wav", "create_wav_buffer", "WavWriter", "AudioPool"]
CASES = [pytest.param(planter, producer, kind, id=f"{planter}-{producer}-{kind}")
         for planter in ("other-user", "root") for producer in PRODUCERS
         for kind in PLANTED_KINDS
         # get_temp_audio_path against root's plants: tests/test_temp_audio.py. A regular
         # file of our own user at a pool's name is what a dead pool leaves: a new pool
         # reclaims it (tests/test_reliability_crashes.py).
         if planter == "other-user" or (producer != "get_temp_audio_path"
                                        and (producer, kind) != ("AudioPool", "regular-file"))]


@pytest.mark.parametrize(("planter", "producer", "kind"), CASES)
def test_a_thing_planted_at_our_next_name_is_never_followed_and_a_fresh_name_is_used(
        shared_ram, monkeypatch, tmp_path, planter, producer, kind) -> None:
    prefix = "luna_audio_pool_" if producer == "AudioPool" else "luna_audio_"
    planted = Planted(planter, shared_ram, f"{prefix}{TOKEN}.wav", kind, tmp_path)
    given = force_first_token(monkeypatch, TOKEN)

    path, release = call_with_deadline(lambda: produce(producer))
    try:
        assert given[0] == TOKEN and len(given) == 2
        assert path == f"{shared_ram}/{prefix}{given[1]}.wav"
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        assert stat.S_IMODE(st.st_mode) == 0o600
        if producer != "get_temp_audio_path":
            np.testing.assert_array_equal(read_wav(path, mmap=False)[0], DATA)
        planted.assert_untouched()
    finally:
        release()


def test_an_atomic_write_to_a_new_temp_name_replaces_a_planted_symlink_never_its_target(
        shared_ram, monkeypatch, tmp_path) -> None:
    # The atomic write names its file first and renames onto that name: a symlink
    # planted there is replaced itself (rename never follows it).
    planted = Planted("other-user", shared_ram, f"luna_audio_{TOKEN}.wav", "symlink-to-decoy",
                      tmp_path)
    force_first_token(monkeypatch, TOKEN)
    path = call_with_deadline(lambda: write_wav(None, DATA, RATE, atomic=True))
    assert path == planted.path and not os.path.islink(path)
    np.testing.assert_array_equal(read_wav(path)[0], DATA)
    assert sha256(planted.decoy) == planted.decoy_hash


def test_an_atomic_write_to_a_new_temp_name_refuses_a_planted_directory_naming_it(
        shared_ram, monkeypatch, tmp_path) -> None:
    planted = Planted("other-user", shared_ram, f"luna_audio_{TOKEN}.wav", "directory", tmp_path)
    force_first_token(monkeypatch, TOKEN)
    with pytest.raises(IsADirectoryError, match="Is a directory") as info:
        call_with_deadline(lambda: write_wav(None, DATA, RATE, atomic=True))
    assert info.value.errno == errno.EISDIR and info.value.filename == planted.path
    planted.assert_untouched()
    assert sorted(os.listdir(shared_ram)) == [os.path.basename(planted.path)]  # no partial


# ---- cleanup and pool reclaim leave planted things alone ----------------------------------------


@pytest.mark.parametrize("kind", PLANTED_KINDS)
def test_cleanup_and_a_pool_start_leave_what_another_user_planted_at_our_names_alone(
        shared_ram, tmp_path, kind) -> None:
    plants = []
    for name in (f"luna_audio_pool_{TOKEN}.wav", f"luna_audio_{TOKEN}.wav",
                 f"luna_daemon_{TOKEN}.wav", f".luna_audio_.partial_{TOKEN}"):
        outside = tmp_path / name
        outside.mkdir()
        plants.append(Planted("other-user", shared_ram, name, kind, outside))
    ours = get_temp_audio_path(create=True)

    call_with_deadline(lambda: AudioPool(slots=1, max_bytes=100).close())
    assert call_with_deadline(cleanup_all_temp_audio) == 1

    assert not os.path.lexists(ours)
    for planted in plants:
        planted.assert_untouched()


@pytest.mark.parametrize("name", ["luna_audio_pool_link.wav", "luna_audio_link.wav"])
def test_a_hard_link_to_a_decoy_planted_at_our_name_loses_only_that_name(
        private_dirs, name) -> None:
    # A regular file of ours by every test (owner, name, no lock): its removal takes the
    # planted name away, and the file it shares with the decoy keeps its bytes.
    elsewhere = Path(private_dirs.ram, "elsewhere")
    elsewhere.mkdir()
    decoy = elsewhere / "decoy.wav"
    decoy.write_bytes(b"precious bytes\n" * 100)
    digest = sha256(decoy)
    os.link(decoy, f"{private_dirs.ram}/{name}")

    AudioPool(slots=1, max_bytes=100).close()
    cleanup_all_temp_audio()

    assert not os.path.lexists(f"{private_dirs.ram}/{name}")
    assert sha256(decoy) == digest and os.stat(decoy).st_nlink == 1


# ---- another user against our files -----------------------------------------------------------


def _attack(dir_fd: int, names: list[str]) -> dict[str, dict[str, int]]:
    """As the other user: try to read, truncate, remove and replace each of our files."""
    outcome: dict[str, dict[str, int]] = {}
    mine = os.open("theirs.wav", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dir_fd)
    os.close(mine)
    for name in names:
        tries = {
            "read": lambda n: os.close(os.open(n, os.O_RDONLY, dir_fd=dir_fd)),
            "truncate": lambda n: os.close(os.open(n, os.O_WRONLY | os.O_TRUNC, dir_fd=dir_fd)),
            "remove": lambda n: os.unlink(n, dir_fd=dir_fd),
            "replace": lambda n: os.rename("theirs.wav", n, src_dir_fd=dir_fd, dst_dir_fd=dir_fd),
        }
        outcome[name] = {}
        for what, attempt in tries.items():
            try:
                attempt(name)
                outcome[name][what] = 0
            except OSError as exc:
                outcome[name][what] = exc.errno
    return outcome


def test_another_user_cannot_read_truncate_remove_or_replace_our_files_in_a_shared_ram_dir(
        shared_ram) -> None:
    releases = []
    paths = []
    for producer in PRODUCERS:
        path, release = produce(producer)
        paths.append(path)
        releases.append(release)
    try:
        digests = {p: sha256(p) for p in paths}
        dir_fd = os.open(shared_ram, os.O_RDONLY | os.O_DIRECTORY)
        try:
            outcome = as_other_user(_attack, dir_fd, [os.path.basename(p) for p in paths])
        finally:
            os.close(dir_fd)
        expected = {"read": errno.EACCES, "truncate": errno.EACCES, "remove": errno.EPERM,
                    "replace": errno.EPERM}
        assert outcome == {os.path.basename(p): expected for p in paths}
        assert {p: sha256(p) for p in paths} == digests
    finally:
        for release in releases:
            release()


def test_another_user_cannot_open_an_anonymous_buffer_through_its_proc_path(private_dirs):
    with create_wav_buffer(100, RATE, anonymous=True) as buf:
        buf.array[:] = 5

        def try_open(path: str) -> int:
            try:
                os.close(os.open(path, os.O_RDONLY))
                return 0
            except OSError as exc:
                return exc.errno

        assert as_other_user(try_open, buf.path) == errno.EACCES
        assert (read_wav(buf.path, mmap=False)[0] == 5).all()


# ---- truncation: sealed anonymous files, replaced named files -----------------------------------

TRUNCATOR = """
import errno, json, os, sys
outcome = {}
for how in ("truncate", "ftruncate"):
    try:
        if how == "truncate":
            os.truncate(sys.argv[1], 0)
        else:
            fd = os.open(sys.argv[1], os.O_RDWR)
            try:
                os.ftruncate(fd, 44)
            finally:
                os.close(fd)
        outcome[how] = 0
    except OSError as exc:
        outcome[how] = exc.errno
print(json.dumps(outcome))
"""


def _run(code: str, *args: str, **options) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=120, **options)


@pytest.mark.parametrize("kind", ["buffer", "pool-slot"])
def test_another_process_cannot_shrink_an_anonymous_file_and_its_reader_reads_it_whole(
        private_dirs, kind) -> None:
    data = (np.arange(200_000) % 7000).astype(np.int16)
    if kind == "buffer":
        owner = create_wav_buffer(len(data), RATE, anonymous=True)
        owner.array[:] = data
        path, close = owner.path, owner.close
    else:
        pool = AudioPool(slots=1, max_bytes=data.nbytes, anonymous=True)
        pooled = pool.write_wav(data, RATE)  # held until the pool closes
        path, close = pooled.path, pool.close
    try:
        mapped, _ = read_wav(path)  # a reader's mapping of the whole file
        done = _run(TRUNCATOR, path)
        assert json.loads(done.stdout) == {"truncate": errno.EPERM, "ftruncate": errno.EPERM}
        np.testing.assert_array_equal(mapped, data)  # touching every page: no SIGBUS
        np.testing.assert_array_equal(read_wav(path, mmap=False)[0], data)
    finally:
        close()


MAPPED_READER = """
import json, sys
import numpy as np
from luna_shm import read_wav
data, _ = read_wav(sys.argv[1], mmap=sys.argv[2] == "mmap")
print("mapped", flush=True)
sys.stdin.readline()
print(json.dumps({"sum": int(data.astype(np.int64).sum()), "frames": len(data)}))
"""


def _with_reader(path: str, mode: str, meddle: Callable[[], object]) -> tuple[int, str]:
    """A reader process reads path (mmap or copy); meddle runs; then the reader touches every
    sample. Return the reader's exit code and output."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    reader = subprocess.Popen([sys.executable, "-c", MAPPED_READER, path, mode], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "mapped\n"
        meddle()
        out, _ = reader.communicate("go\n", timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        reader.stdin.close()
        reader.stdout.close()
    return reader.returncode, out


@pytest.mark.parametrize("atomic", [False, True], ids=["plain", "atomic"])
def test_a_reader_mapping_survives_repeated_write_wav_over_its_path_from_another_process(
        private_dirs, atomic) -> None:
    path = f"{private_dirs.ram}/shared.wav"
    original = (np.arange(300_000) % 9000).astype(np.int16)
    write_wav(path, original, RATE)
    rewriter = f"""
    import numpy as np
    from luna_shm import write_wav
    for i in range(50):  # shorter, longer, empty: each replaces the file by rename
        write_wav({path!r}, np.full((i * 7919) % 400_000, i, np.int16), {RATE},
                  atomic={atomic})
    """
    code, out = _with_reader(path, "mmap", lambda: _run(rewriter, check=True))
    assert code == 0, f"the reader died ({code})"
    assert json.loads(out) == {"sum": int(original.astype(np.int64).sum()),
                                      "frames": len(original)}
    np.testing.assert_array_equal(read_wav(path)[0], np.full((49 * 7919) % 400_000, 49,
                                                             np.int16))


@pytest.mark.parametrize("kind", ["create_wav_buffer", "WavWriter"])
def test_a_buffer_or_writer_made_at_a_path_a_reader_mapped_never_shrinks_that_file(
        private_dirs, kind) -> None:
    path = f"{private_dirs.ram}/shared.wav"
    original = (np.arange(300_000) % 9000).astype(np.int16)
    write_wav(path, original, RATE)

    def remake() -> None:
        if kind == "create_wav_buffer":
            create_wav_buffer(10, RATE, path=path).close()
        else:
            WavWriter(path, RATE).close()

    code, out = _with_reader(path, "mmap", remake)
    assert code == 0, f"the reader died ({code})"
    assert json.loads(out)["frames"] == len(original)


@pytest.mark.parametrize("mode", ["mmap", "copy"])
def test_a_named_file_shrunk_by_a_foreign_program_kills_no_reader(private_dirs, mode) -> None:
    # luna_shm never shrinks a file that others may have mapped, but it cannot stop
    # another program from doing it: a mapping reader then reads zeros (the SIGBUS
    # guard replaced its pages, csrc/guard.c) instead of dying; a copying reader keeps
    # its samples. tests/test_fault_guard.py covers every variant.
    path = f"{private_dirs.ram}/shared.wav"
    original = (np.arange(300_000) % 9000).astype(np.int16)
    write_wav(path, original, RATE)
    code, out = _with_reader(path, mode, lambda: os.truncate(path, 44))
    assert code == 0
    expected = 0 if mode == "mmap" else int(original.astype(np.int64).sum())
    assert json.loads(out) == {"sum": expected, "frames": len(original)}


def test_a_copy_reader_whose_file_is_shrunk_while_it_reads_gets_a_wav_error_not_garbage(
        private_dirs, tmp_path) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (it delays one system call to open a window)")
    path = f"{private_dirs.ram}/shared.wav"
    write_wav(path, np.ones(100_000, np.int16), RATE)
    log = tmp_path / "strace.log"
    # Each read of this file waits half a second: the header has been read (the first
    # line of the log), the samples not yet, when a foreign program cuts the file.
    reader = subprocess.Popen(
        [strace, "-f", "-qq", "-o", str(log), "-P", path, "-e", "signal=none",
         "-e", "trace=pread64,preadv", "-e", "inject=pread64,preadv:delay_enter=500000",
         sys.executable, "-c", textwrap.dedent(f"""
            from luna_shm import WavError, read_wav
            try:
                print(len(read_wav({path!r}, mmap=False)[0]))
            except WavError as exc:
                print(exc)
         """)],
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "PYTHONDONTWRITEBYTECODE": "1"},
        stdout=subprocess.PIPE, text=True)
    try:
        call_with_deadline(lambda: _poll(lambda: log.exists() and " = " in log.read_text()))
        os.truncate(path, 44)
        out, _ = reader.communicate(timeout=120)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
        reader.stdout.close()
    assert reader.returncode == 0
    assert out.strip() == f"{path}: file shrank while it was being read"


def _poll(predicate: Callable[[], bool]) -> bool:
    while not predicate():
        time.sleep(0.002)
    return True


# ---- unsafe places and names --------------------------------------------------------------------


@pytest.mark.parametrize("producer", [p for p in PRODUCERS if p != "get_temp_audio_path"])
@pytest.mark.parametrize("unsafe", ["world-writable-without-sticky-bit", "symlink"])
def test_an_unsafe_luna_shm_dir_sends_every_producer_to_the_fallback_dir_and_is_left_alone(
        private_dirs, monkeypatch, unsafe, producer) -> None:
    real = Path(private_dirs.ram, "real")
    real.mkdir()
    decoy = real / "luna_audio_decoy.wav"
    decoy.write_bytes(b"precious bytes\n" * 100)
    digest = sha256(decoy)
    if unsafe == "symlink":
        candidate = f"{private_dirs.ram}/link"
        os.symlink(real, candidate)
    else:
        candidate = str(real)
        os.chmod(real, 0o777)
    monkeypatch.setenv("LUNA_SHM_DIR", candidate)
    placement.refresh()

    path, release = call_with_deadline(lambda: produce(producer))
    try:
        assert os.path.dirname(path) == private_dirs.fallback
        np.testing.assert_array_equal(read_wav(path, mmap=False)[0], DATA)
        assert os.listdir(real) == ["luna_audio_decoy.wav"]
    finally:
        release()
    if unsafe == "symlink":  # cleanup never follows the link to the decoy
        cleanup_all_temp_audio()
        assert sha256(decoy) == digest


@pytest.mark.parametrize("prefix", ["..", "../luna_audio_", "sub/luna_audio_", "luna\0audio_",
                                    "/etc/luna_audio_"])
def test_a_pool_prefix_that_names_another_directory_is_refused_and_nothing_is_made(
        private_dirs, prefix) -> None:
    refused = r"prefix must not contain '/' or NUL or be '\.' or '\.\.'"
    with pytest.raises(ValueError, match=refused):
        AudioPool(slots=1, max_bytes=100, prefix=prefix)
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("planter", ["root", "other-user"])
@pytest.mark.parametrize("kind", ["create_wav_buffer", "WavWriter"])
def test_a_buffer_or_writer_given_a_fifo_fails_at_once_instead_of_waiting_for_a_reader(
        shared_ram, kind, planter) -> None:
    _plant_as(planter, shared_ram, "pipe.wav", "fifo", "")
    fifo = f"{shared_ram}/pipe.wav"
    with pytest.raises(OSError, match=r"not a regular file \(a FIFO\)") as info:
        if kind == "create_wav_buffer":
            call_with_deadline(lambda: create_wav_buffer(10, RATE, path=fifo))
        else:
            call_with_deadline(lambda: WavWriter(fifo, RATE))
    assert info.value.errno == errno.EINVAL and info.value.filename == fifo
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cleanup_of_a_fifo_another_user_planted_at_our_name_refuses_at_once(shared_ram):
    _plant_as("other-user", shared_ram, "luna_audio_pipe.wav", "fifo", "")
    fifo = f"{shared_ram}/luna_audio_pipe.wav"
    with pytest.raises(PermissionError, match="belongs to another user") as info:
        call_with_deadline(lambda: cleanup_temp_audio(fifo))
    assert info.value.errno == errno.EPERM
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert call_with_deadline(cleanup_all_temp_audio) == 0
