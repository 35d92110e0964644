"""cleanup_temp_audio and cleanup_all_temp_audio remove our files and nothing else.

All files live in private dirs (the private_dirs fixture): a fresh directory in
the /dev/shm tmpfs as the RAM dir and one under pytest's tmp_path as the
fallback dir. Another user's files come from a forked child running as uid 65534.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    FILL_FD_TABLE,
    LIBRARY_PATH,
    OTHER_UID,
    as_other_user,
    call_with_deadline,
    closed_and_readable_dirs,
)
from luna_shm import placement, temp_audio
from luna_shm.temp_audio import (
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    get_temp_audio_path,
)

PREFIXES = ["luna_audio_", "luna_daemon_"]


@pytest.fixture(params=["ram", "fallback"])
def active_dir(request: pytest.FixtureRequest, private_dirs, monkeypatch) -> str:
    """The directory new temp audio goes to: the private RAM dir, or the fallback dir."""
    if request.param == "fallback":
        monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
        return private_dirs.fallback
    return private_dirs.ram


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _decoy(directory: Path, name: str = "decoy.wav") -> tuple[Path, str]:
    """A file that must survive, and its hash."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"not yours to delete\n" * 64)
    return path, _sha256(path)


def _create_in(dir_fd: int, name: str, data: bytes) -> bool:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    os.write(fd, data)
    os.close(fd)
    return True


def create_as_other_user(directory: str, name: str, data: bytes = b"theirs") -> str:
    """Create directory/name from a forked child running as uid 65534; return its path."""
    old_mode = stat.S_IMODE(os.stat(directory).st_mode)
    os.chmod(directory, 0o1777)  # let the other user create a file here, for a moment
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)  # opened as root, inherited
    try:
        as_other_user(_create_in, dir_fd, name, data)
    finally:
        os.close(dir_fd)
        os.chmod(directory, old_mode)
    path = os.path.join(directory, name)
    assert os.lstat(path).st_uid == OTHER_UID
    return path


# ---- cleanup_temp_audio: one file ------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "Path"])
def test_cleanup_removes_our_file_then_reports_it_already_gone(active_dir, prefix, as_type):
    path = get_temp_audio_path(prefix=prefix, create=True)
    assert os.path.dirname(path) == active_dir

    assert cleanup_temp_audio(as_type(path)) is True
    assert not os.path.lexists(path)
    assert cleanup_temp_audio(as_type(path)) is False


def test_cleanup_of_a_name_that_never_existed_returns_false(active_dir) -> None:
    assert cleanup_temp_audio(get_temp_audio_path(create=False)) is False


def test_cleanup_removes_a_file_a_writer_filled(active_dir) -> None:
    path = get_temp_audio_path(create=True)
    Path(path).write_bytes(b"RIFF" + bytes(1000))
    assert cleanup_temp_audio(path) is True
    assert os.listdir(active_dir) == []


# ---- the drop-in's habits: None and "", custom prefixes ---------------------------------


@pytest.mark.parametrize("nothing", [None, ""], ids=["None", "empty"])
def test_cleanup_of_none_or_an_empty_path_returns_false_and_removes_nothing(
    active_dir, nothing
) -> None:
    path = get_temp_audio_path(create=True)
    assert cleanup_temp_audio(nothing) is False
    assert os.path.isfile(path)


def test_cleanup_in_a_finally_block_before_the_path_was_set_lets_the_real_error_through(
    active_dir,
) -> None:
    def render() -> None:
        path = None
        try:
            raise RuntimeError("the TTS engine failed")
        finally:
            cleanup_temp_audio(path)

    with pytest.raises(RuntimeError, match="the TTS engine failed"):
        render()


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [("myapp_", ".wav"), ("", ".raw"), ("tts-", ".tar.gz"), ("voix_é_", "..wav"),
     (".hidden_", ""), ("luna_audio_", ".mp3")],
    ids=["myapp", "no-prefix", "double-suffix", "non-ascii", "hidden-no-suffix", "ours"],
)
@pytest.mark.parametrize("create", [True, False], ids=["created", "written-later"])
def test_cleanup_removes_what_get_temp_audio_path_made_with_any_prefix_and_suffix(
    active_dir, prefix, suffix, create
) -> None:
    path = get_temp_audio_path(suffix, prefix, create=create)
    if not create:
        Path(path).write_bytes(b"RIFF")  # the TTS engine writes the file
    assert cleanup_temp_audio(path) is True
    assert not os.path.lexists(path)
    assert cleanup_temp_audio(path) is False


@pytest.mark.parametrize(
    "name",
    ["tts_config.json", "myapp_" + "0" * 32 + ".wav",
     "myapp_" + uuid.uuid4().hex[:31] + ".wav",
     "myapp_" + uuid.UUID(int=uuid.uuid4().int, version=1).hex + ".wav",
     "myapp_" + uuid.uuid4().hex.upper() + ".wav"],
    ids=["no-token", "zero-token", "31-hex", "uuid1-token", "upper-case-token"],
)
def test_cleanup_refuses_a_name_without_a_uuid4_token_or_our_prefix(active_dir, name) -> None:
    victim, digest = _decoy(Path(active_dir), name)
    with pytest.raises(ValueError, match=r"refusing to remove .*the name lacks our prefixes "
                       r".* and the uuid4 hex token"):
        cleanup_temp_audio(str(victim))
    assert _sha256(victim) == digest


def test_cleanup_of_a_custom_prefix_still_refuses_other_dirs_and_other_users(
    active_dir, tmp_path
) -> None:
    token = uuid.uuid4().hex
    outside, digest = _decoy(tmp_path / "outside", f"myapp_{token}.wav")
    with pytest.raises(ValueError, match="its directory is not one of ours"):
        cleanup_temp_audio(str(outside))
    assert _sha256(outside) == digest
    theirs = create_as_other_user(active_dir, f"myapp_{token}.wav")
    with pytest.raises(PermissionError, match="belongs to another user"):
        cleanup_temp_audio(theirs)
    assert Path(theirs).read_bytes() == b"theirs"


def test_cleanup_all_keeps_to_our_two_prefixes_and_spares_custom_prefix_files(
    active_dir,
) -> None:
    custom = get_temp_audio_path(".wav", "myapp_", create=True)
    ours = get_temp_audio_path(create=True)
    assert cleanup_all_temp_audio() == 1
    assert os.path.isfile(custom) and not os.path.lexists(ours)
    assert cleanup_temp_audio(custom) is True


# ---- cleanup_temp_audio spares a file a live process holds ----------------------------


# Code that makes a holder and sets path: run in this process (exec) and in a child process.
_HOLDERS = {
    "WavBuffer": "held = create_wav_buffer(100, 8000)\npath = held.path",
    "WavWriter": "held = WavWriter(None, 8000)\nheld.write(np.ones(10, np.int16))\n"
                 "path = held.path",
    "PooledWav": "pool = AudioPool(slots=2, max_bytes=4000)\n"
                 "held = pool.write_wav(np.ones(10, np.int16), 8000)\npath = held.path",
    "released-pool-slot": "pool = AudioPool(slots=2, max_bytes=4000)\n"
                          "slot = pool.write_wav(np.ones(10, np.int16), 8000)\n"
                          "path = slot.path\nslot.release()",
}
_HOLDER_PREAMBLE = ("import numpy as np\n"
                    "from luna_shm import AudioPool, WavWriter, create_wav_buffer\n")


@pytest.mark.parametrize("kind", list(_HOLDERS))
def test_cleanup_temp_audio_spares_a_file_held_in_this_process(
    active_dir, kind, caplog
) -> None:
    scope: dict[str, object] = {}
    exec(_HOLDER_PREAMBLE + _HOLDERS[kind], scope)
    path = str(scope["path"])
    before = _sha256(path)
    with caplog.at_level("DEBUG", logger="luna_shm"):
        assert cleanup_temp_audio(path) is False
    assert _sha256(path) == before
    assert any("held by a live process" in r.getMessage() and path in r.getMessage()
               for r in caplog.records)
    assert cleanup_all_temp_audio() == 0
    holder = scope.get("pool", scope.get("held"))
    holder.close()  # type: ignore[union-attr]
    if kind in ("WavBuffer", "WavWriter"):
        assert cleanup_temp_audio(path) is True  # closed: nobody holds it any more
    assert not os.path.lexists(path)


def test_a_closed_buffer_whose_array_is_still_alive_is_held_until_the_array_goes(
    active_dir,
) -> None:
    from luna_shm import create_wav_buffer

    with create_wav_buffer(100, 8000) as buf:
        view = buf.array
    assert cleanup_temp_audio(buf.path) is False  # the mapping keeps the lock
    assert os.path.isfile(buf.path)
    del view
    assert cleanup_temp_audio(buf.path) is True


_HOLD_IN_CHILD = _HOLDER_PREAMBLE + """
import sys
{make}
print(path, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("kind", list(_HOLDERS))
def test_cleanup_temp_audio_spares_a_file_held_by_another_live_process_until_it_is_killed(
    active_dir, kind
) -> None:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    child = subprocess.Popen([sys.executable, "-c", _HOLD_IN_CHILD.format(make=_HOLDERS[kind])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdin is not None and child.stdout is not None
    try:
        path = child.stdout.readline().strip()
        assert os.path.dirname(path) == active_dir
        before = _sha256(path)

        assert cleanup_temp_audio(path) is False
        assert _sha256(path) == before
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    assert cleanup_temp_audio(path) is True  # its holder died: the file is an orphan now
    assert not os.path.lexists(path)


def _refused_path(kind: str, ram: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str]:
    """A path cleanup must refuse; return (path, message pattern, the victim that must survive)."""
    if kind == "etc-passwd":
        return "/etc/passwd", "its directory is not one of ours", "/etc/passwd"
    if kind == "dotdot-escape":
        # Our RAM dir is <ram>/shm; <ram>/shm/../x/... is really <ram>/x/...
        os.mkdir(f"{ram}/shm", 0o700)
        monkeypatch.setenv("LUNA_SHM_DIR", f"{ram}/shm")
        victim, _ = _decoy(Path(ram) / "x", "luna_audio_a.wav")
        return f"{ram}/shm/../x/luna_audio_a.wav", "its directory is not one of ours", str(victim)
    if kind == "relative":
        victim, _ = _decoy(Path(ram), "luna_audio_rel.wav")
        monkeypatch.chdir(ram)
        return "luna_audio_rel.wav", "not an absolute path", str(victim)
    if kind == "dot-relative":
        victim, _ = _decoy(Path(ram), "luna_audio_rel.wav")
        monkeypatch.chdir(ram)
        return "./luna_audio_rel.wav", "not an absolute path", str(victim)
    if kind == "name-without-our-prefix":
        victim, _ = _decoy(Path(ram), "voice.wav")
        return str(victim), "the name lacks our prefixes", str(victim)
    if kind == "prefix-not-at-start":
        victim, _ = _decoy(Path(ram), "x_luna_audio_1.wav")
        return str(victim), "the name lacks our prefixes", str(victim)
    if kind == "planted-subdirectory":
        victim, _ = _decoy(Path(ram) / "luna_audio_dir", "luna_audio_inner.wav")
        return str(victim), "its directory is not one of ours", str(victim)
    if kind == "planted-symlinked-directory":
        elsewhere, _ = _decoy(Path(ram) / "elsewhere", "luna_audio_inner.wav")
        os.symlink(f"{ram}/elsewhere", f"{ram}/luna_audio_link")
        return (f"{ram}/luna_audio_link/luna_audio_inner.wav", "its directory is not one of ours",
                str(elsewhere))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["etc-passwd", "dotdot-escape", "relative", "dot-relative", "name-without-our-prefix",
     "prefix-not-at-start", "planted-subdirectory", "planted-symlinked-directory"],
)
@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "Path"])
def test_cleanup_refuses_paths_that_are_not_ours(private_dirs, monkeypatch, kind, as_type):
    path, message, victim = _refused_path(kind, private_dirs.ram, monkeypatch)
    digest = _sha256(victim)
    with pytest.raises(ValueError, match=f"refusing to remove .*{message}"):
        cleanup_temp_audio(as_type(path))
    assert _sha256(victim) == digest


def test_cleanup_refuses_a_path_with_a_nul_byte(private_dirs) -> None:
    with pytest.raises(ValueError, match="NUL"):
        cleanup_temp_audio(f"{private_dirs.ram}/luna_audio_a\0.wav")


def test_cleanup_refuses_a_bytes_path_with_type_error(private_dirs) -> None:
    path = get_temp_audio_path(create=True)
    with pytest.raises(TypeError, match="path must be str"):
        cleanup_temp_audio(os.fsencode(path))  # type: ignore[arg-type]
    assert os.path.isfile(path)


@pytest.mark.parametrize(("path", "named"), [
    (3, "3"), (3.5, "3.5"), (["/dev/shm/x.wav"], r"\['/dev/shm/x.wav'\]"),
    (b"/" * 100_000, "bytes of length 100000"),
], ids=["int", "float", "list", "long-bytes"])
def test_cleanup_refuses_a_path_that_is_no_path_with_a_type_error_naming_it(
        private_dirs, path, named) -> None:
    kept = get_temp_audio_path(create=True)
    with pytest.raises(TypeError,
                       match=rf"^path must be str, os.PathLike\[str\] or None, got {named}"):
        cleanup_temp_audio(path)
    assert os.path.isfile(kept)


@pytest.mark.parametrize("path", ["relative/" + "a" * 100_000, "/elsewhere/" + "a" * 100_000,
                                  "/x/luna_audio_\0" + "a" * 100_000],
                         ids=["relative", "not-our-dir", "nul"])
def test_cleanup_names_a_refused_path_longer_than_any_real_one_by_its_length(
        private_dirs, path) -> None:
    with pytest.raises(ValueError, match="str of length 1000") as caught:
        cleanup_temp_audio(path)
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize("kind", ["symlink", "regular-file"])
def test_cleanup_refuses_files_under_a_ram_dir_that_is_not_a_real_directory(
    private_dirs, monkeypatch, kind
) -> None:
    real = Path(private_dirs.ram) / "real"
    victim, digest = _decoy(real, "luna_audio_x.wav")
    ram = f"{private_dirs.ram}/ram"
    if kind == "symlink":
        os.symlink(real, ram)
        message = f"{ram} is a symlink"
    else:
        Path(ram).write_bytes(b"")
        message = f"{ram} is not a directory"
    monkeypatch.setenv("LUNA_SHM_DIR", ram)
    with pytest.raises(ValueError, match=f"refusing to remove .*: {message}"):
        cleanup_temp_audio(f"{ram}/luna_audio_x.wav")
    assert cleanup_all_temp_audio() == 0
    assert _sha256(victim) == digest


def test_files_made_through_a_symlinked_tmpdir_can_be_cleaned_up(
    private_dirs, monkeypatch, tmp_path
) -> None:
    link = tmp_path / "tmpdir_link"
    os.symlink(private_dirs.fallback, link)
    monkeypatch.setenv("TMPDIR", str(link))
    monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
    first, second = get_temp_audio_path(create=True), get_temp_audio_path(create=True)
    assert {os.path.dirname(first), os.path.dirname(second)} == {private_dirs.fallback}

    assert cleanup_temp_audio(first) is True
    assert cleanup_all_temp_audio() == 1
    assert os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("target_kind", ["file-elsewhere", "dangling"])
@pytest.mark.parametrize("as_type", [str, Path], ids=["str", "Path"])
def test_cleanup_unlinks_a_symlink_named_like_ours_and_never_its_target(
    active_dir, tmp_path, target_kind, as_type
) -> None:
    target, digest = _decoy(tmp_path / "elsewhere")
    if target_kind == "dangling":
        target = tmp_path / "elsewhere" / "missing.wav"
    link = f"{active_dir}/luna_audio_link.wav"
    os.symlink(target, link)

    assert cleanup_temp_audio(as_type(link)) is True

    assert not os.path.lexists(link)
    if target_kind == "dangling":
        assert not os.path.lexists(target)
    else:
        assert _sha256(target) == digest


@pytest.mark.parametrize("kind", ["regular", "symlink", "directory"])
def test_a_removal_that_finds_another_entry_at_the_name_puts_it_back_whole(
    private_dirs, kind: str
) -> None:
    # What the race above leaves to the removal: the name it moved aside is not the file
    # it examined (here, a stat of another file stands for the one examined). The entry
    # goes back under its name, and no hidden name of ours stays.
    name = f"luna_audio_{uuid.uuid4().hex}.wav"
    path = f"{private_dirs.ram}/{name}"
    if kind == "regular":
        Path(path).write_bytes(b"theirs")
    elif kind == "symlink":
        os.symlink("/nonexistent", path)
    else:
        os.mkdir(path)
    before = os.lstat(path)
    examined = os.lstat(private_dirs.ram)
    dir_fd = os.open(private_dirs.ram, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert temp_audio._unlink_checked(dir_fd, name, (examined.st_dev, examined.st_ino),
                                          private_dirs.ram) is False
    finally:
        os.close(dir_fd)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_nlink) == (
        before.st_ino, before.st_mode, before.st_nlink)
    assert os.listdir(private_dirs.ram) == [name]


_LISTEN_AND_READ = """
import os, socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
directory = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY)  # a short address
server.bind(f"/proc/self/fd/{directory}/{os.path.basename(sys.argv[1])}")
server.listen()
print("ready", flush=True)
reader = os.open(sys.argv[2], os.O_RDONLY)  # waits for a writer, as a player does
print(os.read(reader, 100).decode(), flush=True)
client, _ = server.accept()
print(client.recv(100).decode(), flush=True)
"""


def test_cleanup_leaves_a_daemons_socket_and_a_fifo_a_reader_waits_on(active_dir) -> None:
    # Neither holds a flock, and asking whether a live process uses them would disturb
    # it (a connect, an open that wakes the reader): cleanup_temp_audio leaves both
    # (found in review: it removed both, and the daemon's clients got ENOENT).
    token = uuid.uuid4().hex
    sock_path = f"{active_dir}/luna_daemon_{token}.sock"
    fifo_path = f"{active_dir}/luna_audio_{token}.fifo"
    os.mkfifo(fifo_path)
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    daemon = subprocess.Popen([sys.executable, "-c", _LISTEN_AND_READ, sock_path, fifo_path],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert daemon.stdout is not None
    try:
        assert daemon.stdout.readline() == "ready\n"
        assert cleanup_temp_audio(sock_path) is False
        assert cleanup_temp_audio(fifo_path) is False
        with open(fifo_path, "w") as fifo:  # the reader still finds its FIFO
            fifo.write("from the fifo")
        assert daemon.stdout.readline() == "from the fifo\n"
        directory = os.open(active_dir, os.O_RDONLY)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                # Its clients still find the daemon (through the dir's fd: a short address).
                client.connect(f"/proc/self/fd/{directory}/{os.path.basename(sock_path)}")
                client.sendall(b"from a client")
        finally:
            os.close(directory)
        assert daemon.stdout.readline() == "from a client\n"
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    assert stat.S_ISFIFO(os.lstat(fifo_path).st_mode)


def _immutable(path: str) -> None:
    """chattr +i path (root only): unlink and rename of it fail with EPERM."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file immutable")
    done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")


def test_a_file_that_cannot_be_removed_is_named_whole_and_stops_no_other(active_dir) -> None:
    # Found in review: the first such file ended cleanup_all's scan of its dir (the
    # others stayed), and both cleanups named it by its bare name, not its path.
    ours = [get_temp_audio_path(create=True) for _ in range(5)]
    stuck = ours[2]
    _immutable(stuck)
    try:
        with pytest.raises(PermissionError) as one:
            cleanup_temp_audio(stuck)
        with pytest.raises(PermissionError) as every:
            cleanup_all_temp_audio()
        remaining = sorted(os.listdir(active_dir))
    finally:
        subprocess.run(["chattr", "-i", stuck], check=True)
    assert (one.value.errno, one.value.filename) == (errno.EPERM, stuck)
    assert (every.value.errno, every.value.filename) == (errno.EPERM, stuck)
    assert remaining == [os.path.basename(stuck)]


def _remove_a_write_only_file_of_ours(directory: str) -> list[object]:
    """In a forked child that became uid 65534: make a file, chmod it 0200, clean up."""
    os.environ.update(LUNA_SHM_DIR=directory, TMPDIR=directory)
    placement.refresh()
    path = get_temp_audio_path(create=True)
    assert os.path.dirname(path) == directory
    os.chmod(path, 0o200)
    return [cleanup_temp_audio(path), os.path.lexists(path)]


def test_cleanup_removes_a_write_only_file_of_ours(private_dirs) -> None:
    # Its lock is tested through a write-only open (flock takes any open mode); found in
    # review: the read-only open failed, and the file was reported held and kept forever.
    os.chmod(private_dirs.ram, 0o711)
    directory = f"{private_dirs.ram}/theirs"
    os.mkdir(directory, 0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)
    assert as_other_user(_remove_a_write_only_file_of_ours, directory) == [True, False]


def _clean_up_a_file_of_ours_with_mode_000(directory: str) -> list[object]:
    """In a forked child that became uid 65534: make a file, chmod it 000, clean up,
    keeping what the luna_shm logger said."""
    os.environ.update(LUNA_SHM_DIR=directory, TMPDIR=directory)
    placement.refresh()
    said: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("luna_shm")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    path = get_temp_audio_path(create=True)
    os.chmod(path, 0)
    return [cleanup_temp_audio(path), os.path.lexists(path), said, path]


def test_cleanup_of_a_file_of_ours_it_cannot_open_keeps_it_and_says_why(private_dirs) -> None:
    # Found in review: False, as the README says of a held file, and a DEBUG line saying
    # it was "held by a live process, or it vanished or was replaced meanwhile": neither.
    os.chmod(private_dirs.ram, 0o711)
    directory = f"{private_dirs.ram}/theirs"
    os.mkdir(directory, 0o700)
    os.chown(directory, OTHER_UID, OTHER_UID)
    removed, left, said, path = as_other_user(_clean_up_a_file_of_ours_with_mode_000,
                                              directory)  # type: ignore[misc]
    assert (removed, left) == (False, True)
    assert said == [f"luna_shm: cleanup_temp_audio left {path}: its mode lets this process "
                    "neither read nor write it, so whether a live process holds it cannot "
                    "be tested (chmod it first)"]


def test_cleanup_raises_is_a_directory_error_for_a_directory_at_our_name(active_dir) -> None:
    planted = Path(active_dir) / "luna_audio_dir.wav"
    planted.mkdir()
    (planted / "inside").write_bytes(b"keep")
    with pytest.raises(IsADirectoryError, match="not removing a directory") as info:
        cleanup_temp_audio(str(planted))
    assert info.value.errno == errno.EISDIR
    assert info.value.filename == str(planted)
    assert (planted / "inside").read_bytes() == b"keep"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_cleanup_raises_permission_error_for_another_users_file(active_dir, prefix) -> None:
    theirs = create_as_other_user(active_dir, f"{prefix}theirs.wav")
    with pytest.raises(PermissionError, match="belongs to another user") as info:
        cleanup_temp_audio(theirs)
    assert info.value.errno == errno.EPERM
    assert info.value.filename == theirs
    assert Path(theirs).read_bytes() == b"theirs"


# ---- cleanup_all_temp_audio ------------------------------------------------------------------


def _make_ours(monkeypatch: pytest.MonkeyPatch, where: str, prefix: str, count: int) -> list[str]:
    """count files made through the API in the RAM dir ("ram") or the fallback dir."""
    if where == "fallback":
        monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
    else:
        monkeypatch.delenv("LUNA_SHM_DISABLE", raising=False)
    try:
        return [get_temp_audio_path(prefix=prefix, create=True) for _ in range(count)]
    finally:
        monkeypatch.delenv("LUNA_SHM_DISABLE", raising=False)


def test_cleanup_all_removes_both_prefixes_in_both_dirs_and_counts_them(
    private_dirs, monkeypatch
) -> None:
    ours = []
    for where, dirname in (("ram", private_dirs.ram), ("fallback", private_dirs.fallback)):
        for prefix, count in zip(PREFIXES, (3, 2), strict=True):
            made = _make_ours(monkeypatch, where, prefix, count)
            assert {os.path.dirname(p) for p in made} == {dirname}
            ours += made
    strangers = {}
    for dirname in (private_dirs.ram, private_dirs.fallback):
        for name in ("voice.wav", "luna_other_1.wav", "x_luna_audio_1.wav", "LUNA_AUDIO_1.wav"):
            path, digest = _decoy(Path(dirname), name)
            strangers[path] = digest

    assert cleanup_all_temp_audio() == len(ours) == 10

    assert not any(os.path.lexists(p) for p in ours)
    assert {p: _sha256(p) for p in strangers} == strangers
    assert cleanup_all_temp_audio() == 0


@pytest.mark.parametrize("where", ["ram", "fallback"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_cleanup_all_removes_our_files_in_each_dir_with_each_prefix(
    private_dirs, monkeypatch, where, prefix
) -> None:
    made = _make_ours(monkeypatch, where, prefix, 4)
    assert cleanup_all_temp_audio() == 4
    assert not any(os.path.lexists(p) for p in made)


def test_cleanup_all_still_cleans_the_fallback_dir_when_the_ram_dir_is_missing(
    private_dirs, monkeypatch
) -> None:
    monkeypatch.setenv("LUNA_SHM_DIR", f"{private_dirs.ram}/missing")
    made = [get_temp_audio_path(create=True) for _ in range(3)]
    assert {os.path.dirname(p) for p in made} == {private_dirs.fallback}
    assert cleanup_all_temp_audio() == 3
    assert os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("where", ["ram", "fallback"])
def test_cleanup_all_with_older_than_removes_only_files_older_than_that(
    private_dirs, monkeypatch, where
) -> None:
    now = time.time()
    old = _make_ours(monkeypatch, where, "luna_audio_", 3) + _make_ours(
        monkeypatch, where, "luna_daemon_", 2)
    new = _make_ours(monkeypatch, where, "luna_audio_", 2) + _make_ours(
        monkeypatch, where, "luna_daemon_", 2)
    for path in old:
        os.utime(path, (now - 3600, now - 3600))
    for path in new:
        os.utime(path, (now + 3600, now + 3600))  # far from any cutoff, however slow the run

    assert cleanup_all_temp_audio(older_than=600) == len(old)

    assert not any(os.path.lexists(p) for p in old)
    assert all(os.path.isfile(p) for p in new)
    assert cleanup_all_temp_audio(older_than=7200) == 0
    assert cleanup_all_temp_audio() == len(new)


@pytest.mark.parametrize(
    ("older_than", "error", "message"),
    [
        (-1, ValueError, "older_than must be >= 0 seconds, got -1"),
        (-0.5, ValueError, "older_than must be >= 0 seconds"),
        (float("nan"), ValueError, "older_than must be >= 0 seconds, got nan"),
        ("60", TypeError, "older_than must be a number of seconds, got '60'"),
        (True, TypeError, "older_than must be a number of seconds, got True"),
        ([60], TypeError, "older_than must be a number of seconds"),
    ],
    ids=["negative-int", "negative-float", "nan", "str", "bool", "list"],
)
def test_cleanup_all_rejects_a_bad_older_than_and_removes_nothing(
    private_dirs, older_than, error, message
) -> None:
    path = get_temp_audio_path(create=True)
    with pytest.raises(error, match=message):
        cleanup_all_temp_audio(older_than=older_than)
    assert os.path.isfile(path)


@pytest.mark.parametrize("older_than", [0, 0.0, 5, 2.5])
def test_cleanup_all_accepts_int_and_float_older_than(private_dirs, older_than) -> None:
    path = get_temp_audio_path(create=True)
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert cleanup_all_temp_audio(older_than=older_than) == 1


@pytest.mark.parametrize(
    ("older_than", "error", "message"),
    [
        (-10**400, ValueError,
         "^older_than must be >= 0 seconds, got a negative int of 1329 bits$"),
        (np.float32("nan"), ValueError,
         r"^older_than must be >= 0 seconds, got np.float32\(nan\)$"),
        ("9" * 5000, TypeError,
         "^older_than must be a number of seconds, got str of length 5000$"),
    ],
    ids=["huge-negative-int", "numpy-nan", "long-str"],
)
@pytest.mark.parametrize("call", ["cleanup_all", "iter_unused"])
def test_a_bad_older_than_is_named_briefly_by_both_cleanups_before_anything_is_removed(
    private_dirs, older_than, error, message, call
) -> None:
    path = get_temp_audio_path(create=True)
    os.utime(path, (time.time() - 60, time.time() - 60))
    with pytest.raises(error, match=message):
        if call == "cleanup_all":
            cleanup_all_temp_audio(older_than=older_than)
        else:
            temp_audio.iter_unused_temp_audio(older_than=older_than, remove=True)
    assert os.path.isfile(path)


@pytest.mark.parametrize("older_than", [np.int64(5), np.uint16(5), np.float32(2.5),
                                        Fraction(5, 2)],
                         ids=["int64", "uint16", "float32", "fraction"])
def test_cleanup_all_accepts_numpy_and_other_real_older_than(private_dirs, older_than) -> None:
    path = get_temp_audio_path(create=True)
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert cleanup_all_temp_audio(older_than=older_than) == 1


@pytest.mark.parametrize("older_than", [10**400, math.inf, 1e308],
                         ids=["int-beyond-float", "infinity", "largest-floats"])
@pytest.mark.parametrize("call", ["cleanup_all", "iter_unused"])
def test_an_older_than_longer_than_any_file_has_existed_selects_nothing(
    private_dirs, older_than, call
) -> None:
    path = get_temp_audio_path(create=True)
    os.utime(path, (0, 0))  # as old as a file's time gets: 1970
    if call == "cleanup_all":
        assert cleanup_all_temp_audio(older_than=older_than) == 0
    else:
        assert list(temp_audio.iter_unused_temp_audio(older_than=older_than, remove=True)) == []
    assert os.path.isfile(path)


@pytest.mark.parametrize("where", ["ram", "fallback"])
def test_cleanup_all_skips_links_fifos_directories_and_other_users_files(
    private_dirs, tmp_path, monkeypatch, where
) -> None:
    directory = private_dirs.ram if where == "ram" else private_dirs.fallback
    target, digest = _decoy(tmp_path / "elsewhere")
    os.symlink(target, f"{directory}/luna_audio_link.wav")
    os.symlink(tmp_path / "nowhere", f"{directory}/luna_daemon_dangling.wav")
    os.mkfifo(f"{directory}/luna_audio_fifo.wav")  # opening it for reading would block
    os.mkfifo(f"{directory}/luna_daemon_fifo.wav")
    os.mkdir(f"{directory}/luna_audio_dir.wav")
    Path(f"{directory}/luna_audio_dir.wav/luna_audio_inside.wav").write_bytes(b"keep")
    theirs = [create_as_other_user(directory, f"{p}theirs.wav") for p in PREFIXES]
    ours = _make_ours(monkeypatch, where, "luna_audio_", 2)

    assert call_with_deadline(cleanup_all_temp_audio) == 2

    assert not any(os.path.lexists(p) for p in ours)
    assert os.readlink(f"{directory}/luna_audio_link.wav") == str(target)
    assert _sha256(target) == digest
    assert os.path.islink(f"{directory}/luna_daemon_dangling.wav")
    assert not os.path.lexists(tmp_path / "nowhere")
    for name in ("luna_audio_fifo.wav", "luna_daemon_fifo.wav"):
        assert stat.S_ISFIFO(os.lstat(f"{directory}/{name}").st_mode)
    assert Path(f"{directory}/luna_audio_dir.wav/luna_audio_inside.wav").read_bytes() == b"keep"
    for path in theirs:
        assert os.lstat(path).st_uid == 65534
        assert Path(path).read_bytes() == b"theirs"


_FILL_FD_TABLE = """
import errno, json, os, resource, sys
import luna_shm
path = luna_shm.get_temp_audio_path(create=True)
""" + FILL_FD_TABLE + """
for _ in range(int(sys.argv[1])):  # free fds: 1 lets the dir open, and its scan fail
    os.close(held.pop())
result = {}
for name, call in (("cleanup_all", luna_shm.cleanup_all_temp_audio),
                   ("iter_unused", lambda: len(list(luna_shm.iter_unused_temp_audio()))),
                   ("cleanup_one", lambda: luna_shm.cleanup_temp_audio(path))):
    try:
        result[name] = ["returned", call()]
    except OSError as exc:
        result[name] = ["raised", exc.errno, exc.filename]
for fd in held:
    os.close(fd)
result["file_left"] = os.path.exists(path)
result["path"] = path
print(json.dumps(result))
"""


@pytest.mark.parametrize("free_fds", [0, 1])
def test_cleanup_all_raises_emfile_instead_of_reporting_a_clean_dir_when_the_fd_table_is_full(
    private_dirs, free_fds: int,
) -> None:
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    done = subprocess.run([sys.executable, "-c", _FILL_FD_TABLE, str(free_fds)],
                          capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = ["raised", errno.EMFILE, private_dirs.ram]
    # With one fd free cleanup_temp_audio opens the dir, and then cannot open the file
    # to test its lock: EMFILE naming the file, not False as if a live process held it.
    path = result.pop("path")
    one = ["raised", errno.EMFILE, private_dirs.ram if free_fds == 0 else path]
    assert result == {"cleanup_all": expected, "iter_unused": expected, "cleanup_one": one,
                      "file_left": True}


def _cleanup_all_as_other_user(closed: str, readable: str) -> dict[str, object]:
    """In a forked child that became uid 65534: cleanup_all with an unreadable RAM dir."""
    os.environ.update(LUNA_SHM_DIR=closed, TMPDIR=readable)
    placement.refresh()
    made = get_temp_audio_path(create=True)
    result: dict[str, object] = {"made_in": os.path.dirname(made)}
    try:
        result["returned"] = cleanup_all_temp_audio()
    except OSError as exc:
        result["raised"] = [type(exc).__name__, exc.errno, exc.filename]
    result["file_left"] = os.path.lexists(made)
    return result


def test_cleanup_all_raises_permission_error_for_an_unreadable_dir_after_cleaning_the_other(
    private_dirs,
) -> None:
    closed, readable = closed_and_readable_dirs(private_dirs.ram)
    assert as_other_user(_cleanup_all_as_other_user, closed, readable) == {
        "made_in": readable, "file_left": False,
        "raised": ["PermissionError", errno.EACCES, closed]}


def _cleanups_in_a_dir_not_searchable_as_other_user(ram: str, readable: str
                                                   ) -> dict[str, object]:
    """In a forked child that became uid 65534: both cleanups with a RAM dir it may list
    but not search (mode 0744), which holds a file of ours by name."""
    os.environ.update(LUNA_SHM_DIR=ram, TMPDIR=readable)
    placement.refresh()
    result: dict[str, object] = {}
    for what, call in (("one", lambda: cleanup_temp_audio(f"{ram}/luna_audio_x.wav")),
                       ("all", cleanup_all_temp_audio)):
        try:
            result[what] = call()
        except OSError as exc:
            result[what] = [type(exc).__name__, exc.errno, exc.filename]
    return result


def test_a_file_whose_dir_cannot_be_searched_is_named_whole_by_both_cleanups(
    private_dirs,
) -> None:
    # Found in session 22: the error named only "luna_audio_x.wav", not which dir.
    _, readable = closed_and_readable_dirs(private_dirs.ram)
    listed_only = f"{private_dirs.ram}/listed_only"
    os.mkdir(listed_only, 0o744)  # root's: others may read the names, not reach the files
    Path(listed_only, "luna_audio_x.wav").write_bytes(b"")
    expected = ["PermissionError", errno.EACCES, f"{listed_only}/luna_audio_x.wav"]
    assert as_other_user(_cleanups_in_a_dir_not_searchable_as_other_user, listed_only,
                         readable) == {"one": expected, "all": expected}


def test_cleanup_names_a_name_too_long_for_any_file_whole(private_dirs) -> None:
    # Found in session 22: ENAMETOOLONG named only the name, not its directory.
    path = f"{private_dirs.ram}/luna_audio_{'x' * 300}.wav"
    with pytest.raises(OSError) as raised:
        cleanup_temp_audio(path)
    assert (raised.value.errno, raised.value.filename) == (errno.ENAMETOOLONG, path)


def _race(monkeypatch: pytest.MonkeyPatch, victim: str, how: str) -> None:
    """Change victim just after cleanup_all has examined it and before it opens it."""
    real = temp_audio._examine

    def meddle(dir_fd: int, name: str, st: os.stat_result, **options: object) -> str:
        if name == victim:
            os.unlink(name, dir_fd=dir_fd)
            if how == "fifo":
                os.mkfifo(name, dir_fd=dir_fd)
            elif how == "symlink":
                os.symlink("decoy.wav", name, dir_fd=dir_fd)
        return real(dir_fd, name, st, **options)

    monkeypatch.setattr(temp_audio, "_examine", meddle)


@pytest.mark.parametrize("how", ["vanished", "fifo", "symlink"])
def test_cleanup_all_never_touches_a_file_swapped_after_it_was_examined(
    private_dirs, monkeypatch, how
) -> None:
    decoy, digest = _decoy(Path(private_dirs.ram))
    ours = [get_temp_audio_path(create=True) for _ in range(3)]
    victim = os.path.basename(ours[1])
    _race(monkeypatch, victim, how)

    assert call_with_deadline(cleanup_all_temp_audio) == 2

    path = ours[1]
    if how == "vanished":
        assert not os.path.lexists(path)
    elif how == "fifo":
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
    else:
        assert os.readlink(path) == "decoy.wav"
    assert _sha256(decoy) == digest
    assert not os.path.lexists(ours[0]) and not os.path.lexists(ours[2])


# A second process that keeps renaming files over one of our names: in turn an unheld
# file (or a symlink) and a file it holds with a shared flock, as a writer does. It counts
# the held files that lost their last name while they had ours (st_nlink 0 before it
# replaced them itself): only a cleanup can have unlinked them.
_RENAME_HELD_FILES_OVER = """
import fcntl, os, sys, uuid
name, between, swaps = sys.argv[1], sys.argv[2], int(sys.argv[3])
directory = os.path.dirname(name)
lost = 0
held = None
print("ready", flush=True)
for _ in range(swaps):
    spare = f"{directory}/spare_{uuid.uuid4().hex}"
    if between == "symlink":
        os.symlink("/nonexistent", spare)
    else:
        os.close(os.open(spare, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    if held is not None and os.fstat(held).st_nlink == 0:
        lost += 1
    os.rename(spare, name)
    if held is not None:
        os.close(held)
    fresh = f"{directory}/held_{uuid.uuid4().hex}"
    held = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_SH)
    os.rename(fresh, name)
print(lost, flush=True)
"""


@pytest.mark.parametrize("between", ["regular", "symlink"])
def test_cleanup_never_unlinks_a_held_file_renamed_over_the_name_as_it_removes_it(
    private_dirs, between: str
) -> None:
    # The race: cleanup examined the name (an unheld file, or a link), and before its
    # unlink another process renamed a file it holds over the name. An unlink by name
    # took the held file (found in review: 1 in 7 swaps with a file between, 1 in 140
    # with a link). Now the entry is moved aside first and removed only if it is the
    # file examined; another one goes back.
    name = f"{private_dirs.ram}/luna_audio_{uuid.uuid4().hex}.wav"
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    swapper = subprocess.Popen(
        [sys.executable, "-c", _RENAME_HELD_FILES_OVER, name, between, "20000"],
        stdout=subprocess.PIPE, text=True, env=env)
    assert swapper.stdout is not None
    try:
        assert swapper.stdout.readline() == "ready\n"
        removed = 0
        while swapper.poll() is None:
            removed += cleanup_temp_audio(name)
        lost = int(swapper.stdout.read())
    finally:
        swapper.kill()
        swapper.wait()
        swapper.stdout.close()
    assert removed > 0  # the race was run: cleanups did remove the unheld entries
    assert lost == 0


def test_cleanup_all_tolerates_files_vanishing_between_listing_and_examining(
    private_dirs, monkeypatch
) -> None:
    ours = [get_temp_audio_path(create=True) for _ in range(4)]
    doomed = {os.path.basename(p) for p in ours[:2]}
    real = temp_audio.is_our_name

    def vanish_while_listed(name: str) -> bool:
        if name in doomed:
            os.unlink(os.path.join(private_dirs.ram, name))
        return real(name)

    monkeypatch.setattr(temp_audio, "is_our_name", vanish_while_listed)
    assert cleanup_all_temp_audio() == 2
    assert os.listdir(private_dirs.ram) == []


def test_cleanup_all_and_a_concurrent_deleter_remove_each_file_exactly_once(private_dirs) -> None:
    total = 400
    paths = [get_temp_audio_path(create=True) for _ in range(total)]
    deleted_by_thread = 0
    start = threading.Barrier(2)

    def deleter() -> None:
        nonlocal deleted_by_thread
        start.wait()
        for path in reversed(paths):
            try:
                os.unlink(path)
                deleted_by_thread += 1
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=deleter)
    thread.start()
    start.wait()
    removed = cleanup_all_temp_audio()
    thread.join()

    assert removed + deleted_by_thread == total
    assert os.listdir(private_dirs.ram) == []


_HOLD_SHARED_LOCK = """
import os, sys, time
from luna_shm import _lowlevel
fd = os.open(sys.argv[1], os.O_RDONLY)
assert _lowlevel.lock(fd, exclusive=False)
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("where", ["ram", "fallback"])
def test_cleanup_all_skips_a_file_locked_by_a_live_process_until_it_is_killed(
    private_dirs, monkeypatch, where
) -> None:
    held, free = _make_ours(monkeypatch, where, "luna_daemon_", 2)
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_SHARED_LOCK, held],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"

        assert cleanup_all_temp_audio() == 1
        assert os.path.isfile(held)
        assert not os.path.lexists(free)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL

    assert cleanup_all_temp_audio() == 1
    assert not os.path.lexists(held)


def test_cleanup_all_removes_our_partial_writes_but_no_other_hidden_file(private_dirs) -> None:
    # Hidden names are ours only as partial_path makes them: a user's dotfile that
    # happens to start with one of our prefixes is not.
    partial = f"{private_dirs.ram}/.luna_audio_.partial_{uuid.uuid4().hex}"
    theirs = [f"{private_dirs.ram}/.luna_audio_hidden",
              f"{private_dirs.ram}/.luna_daemon_state.json",
              f"{private_dirs.fallback}/.luna_audio_.partial_notatoken",
              f"{private_dirs.fallback}/.luna_daemon_{uuid.uuid4().hex}.wav"]
    for path in [partial, *theirs]:
        Path(path).write_bytes(b"x")
    assert cleanup_all_temp_audio() == 1
    assert not os.path.exists(partial)
    for path in theirs:
        assert Path(path).read_bytes() == b"x"
