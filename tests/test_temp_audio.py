"""get_temp_audio_path: names, validation, uniqueness, safe creation (0600, O_EXCL, O_CLOEXEC).

Every test here works in private directories (the private_dirs fixture): a fresh
directory inside the /dev/shm tmpfs as the RAM dir, and one under pytest's
tmp_path as the fallback dir. Nothing touches the machine's shared /dev/shm or /tmp.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

import luna_shm
from helpers import force_first_token
from luna_shm import _lowlevel, _newfile, temp_audio
from luna_shm.temp_audio import get_temp_audio_path, temp_audio_path

HEX32 = "[0-9a-f]{32}"


@pytest.fixture(params=["ram", "fallback"])
def active_dir(request: pytest.FixtureRequest, private_dirs, monkeypatch) -> str:
    """The directory new temp audio goes to: the private RAM dir, or the fallback dir."""
    if request.param == "fallback":
        monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
        expected = private_dirs.fallback
    else:
        expected = private_dirs.ram
    assert luna_shm.temp_dir() == expected
    return expected


def _token_of(path: str, prefix: str = "luna_audio_", suffix: str = ".wav") -> str:
    name = os.path.basename(path)
    assert name.startswith(prefix) and name.endswith(suffix), name
    return name[len(prefix):len(name) - len(suffix)]


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- the documented surface ------------------------------------------------------------


@pytest.mark.parametrize("module", [luna_shm, temp_audio], ids=["luna_shm", "temp_audio"])
def test_constants_have_their_documented_values(module) -> None:
    assert module.RAM_DISK_DIR == "/dev/shm"
    assert module.FALLBACK_DIR == "/tmp"
    assert module.AUDIO_PREFIX == "luna_audio_"
    assert module.DAEMON_PREFIX == "luna_daemon_"


def test_temp_dir_and_refresh_are_exported_from_package_and_module() -> None:
    for name in ("temp_dir", "refresh_temp_dir", "is_using_ram_disk"):
        assert getattr(luna_shm, name) is getattr(temp_audio, name)


def test_signature_is_the_documented_drop_in_helper_signature() -> None:
    params = inspect.signature(get_temp_audio_path).parameters
    assert list(params)[:3] == ["suffix", "prefix", "create"]
    assert params["suffix"].default == ".wav"
    assert params["suffix"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["prefix"].default == "luna_audio_"
    assert params["prefix"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert params["create"].default is False
    assert params["create"].kind is inspect.Parameter.KEYWORD_ONLY


def test_create_cannot_be_passed_positionally(private_dirs) -> None:
    with pytest.raises(TypeError, match="positional argument"):
        get_temp_audio_path(".wav", "luna_audio_", False)  # type: ignore[misc]
    assert os.listdir(private_dirs.ram) == []


# ---- path generation ---------------------------------------------------------------------


def test_default_path_is_dir_audio_prefix_uuid4_hex_and_wav_suffix(active_dir) -> None:
    path = get_temp_audio_path()
    assert re.fullmatch(re.escape(active_dir) + "/luna_audio_" + HEX32 + r"\.wav", path)
    token = uuid.UUID(hex=_token_of(path))
    assert token.version == 4
    assert token.variant == uuid.RFC_4122


def test_temp_dir_is_the_directory_new_paths_go_to(active_dir) -> None:
    assert luna_shm.temp_dir() == active_dir
    assert os.path.dirname(get_temp_audio_path()) == active_dir
    assert os.path.dirname(get_temp_audio_path(create=False)) == active_dir


@pytest.mark.parametrize(
    ("args", "kwargs", "prefix", "suffix"),
    [
        ((".mp3",), {}, "luna_audio_", ".mp3"),
        ((".wav", "luna_daemon_"), {}, "luna_daemon_", ".wav"),
        ((), {"suffix": ".ogg", "prefix": "luna_daemon_"}, "luna_daemon_", ".ogg"),
        ((), {"suffix": ""}, "luna_audio_", ""),
        ((), {"prefix": "", "suffix": ".raw"}, "", ".raw"),
        ((), {"prefix": "tts-", "suffix": ".tar.gz"}, "tts-", ".tar.gz"),
        ((), {"prefix": "voix_é_", "suffix": "..wav"}, "voix_é_", "..wav"),
    ],
    ids=["suffix-positional", "prefix-positional", "keywords", "empty-suffix",
         "empty-prefix", "custom-prefix-double-suffix", "non-ascii-and-dots"],
)
@pytest.mark.parametrize("create", [True, False], ids=["create", "name-only"])
def test_path_uses_the_given_prefix_and_suffix(
    active_dir, args, kwargs, prefix, suffix, create
) -> None:
    path = get_temp_audio_path(*args, create=create, **kwargs)
    pattern = re.escape(f"{active_dir}/{prefix}") + HEX32 + re.escape(suffix)
    assert re.fullmatch(pattern, path), path
    assert os.path.isfile(path) is create


@pytest.mark.parametrize("which", ["suffix", "prefix"])
@pytest.mark.parametrize(
    "value", ["/", "a/b", "../x", "a\0b", "\0", ".", ".."],
    ids=["slash", "inner-slash", "parent-slash", "inner-nul", "nul", "dot", "dotdot"],
)
@pytest.mark.parametrize("create", [True, False], ids=["create", "name-only"])
def test_bad_prefix_or_suffix_is_refused_with_value_error_and_creates_nothing(
    private_dirs, which, value, create
) -> None:
    with pytest.raises(ValueError, match=f"{which} must not contain '/' or NUL or be '.' or '..'"):
        get_temp_audio_path(**{which: value}, create=create)
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []


@pytest.mark.parametrize("which", ["suffix", "prefix"])
@pytest.mark.parametrize("create", [True, False], ids=["create", "name-only"])
def test_a_prefix_or_suffix_no_file_name_can_hold_is_refused_naming_it(
    private_dirs, which, create
) -> None:
    # A lone surrogate has no encoding; found in review: a name-only call returned a path
    # that no writer could open, and create=True raised a UnicodeEncodeError naming nothing.
    with pytest.raises(ValueError, match=f"{which} cannot be encoded as a file name .*"
                                         + re.escape(repr(".w\ud800v"))):
        get_temp_audio_path(**{which: ".w\ud800v"}, create=create)
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize("which", ["suffix", "prefix"])
@pytest.mark.parametrize("value", [None, b".wav", 3, Path(".wav")],
                         ids=["None", "bytes", "int", "Path"])
def test_non_string_prefix_or_suffix_is_refused_with_type_error_naming_it(private_dirs, which,
                                                                          value) -> None:
    with pytest.raises(TypeError) as info:
        get_temp_audio_path(**{which: value})
    assert str(info.value) == f"{which} must be a str, got {value!r}"
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(
    ("size_hint", "error", "message"),
    [
        (-1, ValueError, "size_hint must be >= 0"),
        ("1024", TypeError, "size_hint must be an int"),
        (1.5, TypeError, "size_hint must be an int"),
        (True, TypeError, "size_hint must be an int"),
    ],
    ids=["negative", "str", "float", "bool"],
)
def test_bad_size_hint_is_refused_and_creates_nothing(private_dirs, size_hint, error, message):
    with pytest.raises(error, match=message):
        get_temp_audio_path(size_hint=size_hint)
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(("size_hint", "error", "message"), [
    (-10**100, ValueError, "^size_hint must be >= 0, got a negative int of 333 bits$"),
    ("1" * 5000, TypeError, "^size_hint must be an int, got str of length 5000$"),
], ids=["huge-negative-int", "long-str"])
@pytest.mark.parametrize("call", ["get_temp_audio_path", "temp_audio_path"])
def test_a_huge_bad_size_hint_is_named_by_its_size_not_its_whole_value(
        private_dirs, size_hint, error, message, call) -> None:
    with pytest.raises(error, match=message):
        if call == "get_temp_audio_path":
            get_temp_audio_path(size_hint=size_hint, create=True)
        else:
            with temp_audio_path(size_hint=size_hint, create=True):
                pass
    assert os.listdir(private_dirs.ram) == []


def test_a_huge_size_hint_goes_to_the_fallback_dir_and_its_log_line_names_it_by_its_size(
        private_dirs, caplog) -> None:
    # Found in review: a valid size hint of 10**5000 raised "ValueError: Exceeds the limit
    # (4300 digits) for integer string conversion" from the line logging it.
    caplog.set_level(logging.WARNING, logger="luna_shm")
    path = get_temp_audio_path(size_hint=10**5000)
    assert os.path.dirname(path) == private_dirs.fallback
    [message] = [r.getMessage() for r in caplog.records if r.name == "luna_shm"]
    assert message.startswith(
        "luna_shm: a file of a 16610-bit number of bytes does not fit in ")


@pytest.mark.parametrize("size_hint", [np.int64(4096), np.uint32(4096), np.int8(0)],
                         ids=["int64", "uint32", "int8-zero"])
@pytest.mark.parametrize("create", [False, True])
def test_a_numpy_integer_size_hint_is_taken_like_an_int(private_dirs, size_hint, create) -> None:
    path = get_temp_audio_path(size_hint=size_hint, create=create)
    assert os.path.dirname(path) == private_dirs.ram
    assert os.path.isfile(path) is create


@pytest.mark.parametrize("size_hint", [np.float64(4096.0), np.bool_(True)],
                         ids=["numpy-float", "numpy-bool"])
def test_a_numpy_size_hint_that_is_not_an_integer_is_a_type_error_naming_it(
        private_dirs, size_hint) -> None:
    message = f"^size_hint must be an int, got {re.escape(repr(size_hint))}$"
    with pytest.raises(TypeError, match=message):
        get_temp_audio_path(size_hint=size_hint)


def test_small_size_hint_keeps_the_file_on_the_ram_disk(private_dirs) -> None:
    path = get_temp_audio_path(size_hint=4096)
    assert os.path.dirname(path) == private_dirs.ram


# ---- uniqueness ------------------------------------------------------------------------------


def test_many_calls_give_distinct_uuid4_tokens(private_dirs) -> None:
    tokens = [_token_of(get_temp_audio_path(create=False)) for _ in range(3000)]
    assert len(set(tokens)) == len(tokens)
    assert all(uuid.UUID(hex=t).version == 4 for t in tokens)
    assert os.listdir(private_dirs.ram) == []


def test_threads_get_distinct_paths_and_each_one_is_created(private_dirs) -> None:
    threads_count, per_thread = 8, 200
    results: list[list[str]] = [[] for _ in range(threads_count)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def work(index: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                results[index].append(get_temp_audio_path(create=i % 2 == 0))
        except BaseException as exc:  # reported below, with the thread's failure
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    paths = [p for chunk in results for p in chunk]
    assert len(paths) == threads_count * per_thread
    assert len(set(paths)) == len(paths)
    created = {p for chunk in results for p in chunk[0::2]}
    assert set(os.listdir(private_dirs.ram)) == {os.path.basename(p) for p in created}


def _paths_in_child(out_file: str, start, count: int) -> None:
    """One of the processes of the uniqueness test: write its paths as JSON."""
    start.wait()
    created = [get_temp_audio_path(create=True) for _ in range(count)]
    names = [get_temp_audio_path(create=False) for _ in range(count)]
    with open(out_file, "w", encoding="utf-8") as out:
        json.dump({"pid": os.getpid(), "created": created, "names": names}, out)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_eight_processes_get_distinct_paths(private_dirs, tmp_path, start_method) -> None:
    # fork copies every bit of state the parent had (a seeded RNG would repeat
    # in each child); spawn starts fresh interpreters. Names must differ in both.
    ctx = multiprocessing.get_context(start_method)
    start = ctx.Barrier(8)
    count = 250
    outputs = [str(tmp_path / f"child{i}.json") for i in range(8)]
    procs = [ctx.Process(target=_paths_in_child, args=(out, start, count)) for out in outputs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    results = [json.loads(Path(out).read_text()) for out in outputs]
    assert len({r["pid"] for r in results} | {os.getpid()}) == 9
    created = [p for r in results for p in r["created"]]
    names = [p for r in results for p in r["names"]]
    assert len(set(created) | set(names)) == 8 * count * 2
    assert all(os.path.dirname(p) == private_dirs.ram for p in created + names)
    assert set(os.listdir(private_dirs.ram)) == {os.path.basename(p) for p in created}


# ---- safe creation -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def test_created_file_is_an_empty_regular_file_of_ours_with_mode_0600(active_dir, umask) -> None:
    old = os.umask(umask)
    try:
        path = get_temp_audio_path(create=True)
    finally:
        os.umask(old)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 0
    assert st.st_uid == os.geteuid()


def test_created_file_can_be_rewritten_by_a_writer_that_opens_it_wb(active_dir) -> None:
    path = get_temp_audio_path(create=True)
    with open(path, "wb") as out:
        out.write(b"RIFF")
    assert Path(path).read_bytes() == b"RIFF"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_create_false_returns_a_name_that_does_not_exist(active_dir) -> None:
    path = get_temp_audio_path(create=False)
    assert os.path.dirname(path) == active_dir
    assert not os.path.lexists(path)
    assert os.listdir(active_dir) == []


# ---- the drop-in's habits: nothing exists until it is written ---------------------------


def test_by_default_nothing_is_created_until_a_writer_writes_the_file(active_dir) -> None:
    path = get_temp_audio_path(".wav")
    assert os.path.dirname(path) == active_dir
    assert not os.path.lexists(path)
    assert os.listdir(active_dir) == []
    luna_shm.write_wav(path, np.ones(10, np.int16), 8000)
    assert os.path.isfile(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_exists_after_a_failed_render_tells_that_nothing_was_written(active_dir) -> None:
    def render(text: str, path: str) -> None:
        raise RuntimeError(f"the TTS engine cannot say {text!r}")

    path = get_temp_audio_path(".wav")
    with pytest.raises(RuntimeError, match="cannot say"):
        render("hello", path)
    assert not os.path.exists(path)  # the player is not handed an empty file
    assert os.listdir(active_dir) == []


@pytest.mark.parametrize("tool", ["sh-noclobber", "open-x"])
def test_a_tool_that_refuses_to_overwrite_writes_the_default_path(active_dir, tool) -> None:
    # As `ffmpeg -i in.mp3 path` without -y: an existing file is not overwritten.
    path = get_temp_audio_path(".wav")
    if tool == "sh-noclobber":
        done = subprocess.run(["sh", "-c", 'set -C; printf RIFF > "$1"', "sh", path],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    else:
        with open(path, "xb") as out:
            out.write(b"RIFF")
    assert Path(path).read_bytes() == b"RIFF"


def test_create_true_still_reserves_a_private_empty_file(active_dir) -> None:
    path = get_temp_audio_path(".wav", create=True)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert stat.S_IMODE(st.st_mode) == 0o600


# ---- temp_audio_path: a path that is always cleaned up -----------------------------------


@pytest.mark.parametrize("module", [luna_shm, temp_audio], ids=["luna_shm", "temp_audio"])
def test_temp_audio_path_is_exported(module) -> None:
    assert module.temp_audio_path is temp_audio.temp_audio_path
    assert "temp_audio_path" in module.__all__


def test_temp_audio_path_yields_a_new_name_and_removes_the_written_file(active_dir) -> None:
    with temp_audio_path(".mp3", "myapp_") as path:
        assert re.fullmatch(re.escape(f"{active_dir}/myapp_") + HEX32 + r"\.mp3", path)
        assert not os.path.lexists(path)
        Path(path).write_bytes(b"ID3")
    assert not os.path.lexists(path)
    assert os.listdir(active_dir) == []


def test_temp_audio_path_removes_the_file_when_the_writer_fails(active_dir) -> None:
    with pytest.raises(RuntimeError, match="the writer failed"), temp_audio_path() as path:
        with open(path, "wb") as out:
            out.write(b"RIFF half a head")
        raise RuntimeError("the writer failed")
    assert not os.path.lexists(path)
    assert os.listdir(active_dir) == []


def test_temp_audio_path_with_nothing_written_leaves_nothing(active_dir) -> None:
    with temp_audio_path(create=True) as path:
        assert os.path.isfile(path)
    with temp_audio_path() as unwritten:
        pass
    assert not os.path.lexists(path) and not os.path.lexists(unwritten)
    assert os.listdir(active_dir) == []


def test_temp_audio_path_removes_its_file_after_a_block_that_changed_the_temp_dirs(
    private_dirs, monkeypatch, tmp_path
) -> None:
    # Found in review: the removal asked the dirs of the moment, and refused the block's
    # own file as "not in one of ours".
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with temp_audio_path(create=True) as path:
        monkeypatch.setenv("LUNA_SHM_DIR", str(elsewhere))
        monkeypatch.setenv("TMPDIR", str(elsewhere))
    assert os.path.dirname(path) == private_dirs.ram
    assert not os.path.lexists(path)


def test_temp_audio_path_lets_the_blocks_error_through_when_removal_fails_too(
    active_dir, caplog
) -> None:
    with (caplog.at_level("WARNING", logger="luna_shm"),
          pytest.raises(RuntimeError, match="the writer failed"),
          temp_audio_path() as path):
        os.mkdir(path)  # something that cannot be removed as a file
        raise RuntimeError("the writer failed")
    assert any("could not remove" in r.getMessage() and path in r.getMessage()
               for r in caplog.records)
    with (pytest.raises(IsADirectoryError, match="not removing a directory"),
          temp_audio_path() as other):
        os.mkdir(other)


def test_temp_audio_path_refuses_bad_arguments_before_yielding(private_dirs) -> None:
    with (pytest.raises(ValueError, match="prefix must not contain '/'"),
          temp_audio_path(prefix="../x")):
        raise AssertionError("the block must not run")
    assert os.listdir(private_dirs.ram) == []


def test_get_temp_audio_path_leaves_no_descriptor_open(private_dirs) -> None:
    get_temp_audio_path(create=True)  # warm up: imports, caches
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(100):
        get_temp_audio_path(create=True)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_c_layer_create_excl_sets_close_on_exec(private_dirs) -> None:
    fd = _lowlevel.create_excl(f"{private_dirs.ram}/luna_audio_cloexec.wav")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


_FD_PROBE = """
import json, os, sys
wanted = json.loads(sys.argv[1])
links = {}
for n in os.listdir("/proc/self/fd"):
    try:
        links[int(n)] = os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        pass
fstat = {}
for name, (fd, dev, ino) in wanted.items():
    try:
        st = os.fstat(fd)
        fstat[name] = (st.st_dev, st.st_ino) == (dev, ino)
    except OSError:
        fstat[name] = False
print(json.dumps({"links": sorted(links.values()), "fstat": fstat}))
"""


def test_c_layer_descriptor_is_not_visible_in_a_child_process(private_dirs) -> None:
    ours_path = f"{private_dirs.ram}/luna_audio_cloexec.wav"
    control_path = f"{private_dirs.ram}/control_inheritable"
    ours = _lowlevel.create_excl(ours_path)
    # The control proves the probe sees inherited descriptors at all.
    control = os.open(control_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.set_inheritable(control, True)
    try:
        wanted = {name: (fd, os.fstat(fd).st_dev, os.fstat(fd).st_ino)
                  for name, fd in (("ours", ours), ("control", control))}
        done = subprocess.run(
            [sys.executable, "-c", _FD_PROBE, json.dumps(wanted)],
            close_fds=False, capture_output=True, text=True, timeout=60, check=True,
        )
    finally:
        os.close(ours)
        os.close(control)
    seen = json.loads(done.stdout)
    assert seen["fstat"] == {"ours": False, "control": True}
    assert control_path in seen["links"]
    assert ours_path not in seen["links"]


def test_c_layer_create_excl_refuses_an_existing_name_with_eexist(private_dirs) -> None:
    path = f"{private_dirs.ram}/luna_audio_taken.wav"
    Path(path).write_bytes(b"first")
    with pytest.raises(FileExistsError) as info:
        _lowlevel.create_excl(path)
    assert info.value.errno == errno.EEXIST
    assert info.value.filename == path
    assert Path(path).read_bytes() == b"first"


# ---- planted names: the collision is forced by handing out a planted token first ---------


def _plant(kind: str, path: str, outside: Path):
    """Put a kind of thing at path; return a function that asserts it was left untouched."""
    if kind == "dangling-symlink":
        target = outside / "would_be_created.wav"
        os.symlink(target, path)

        def check() -> None:
            assert os.readlink(path) == str(target)
            assert not os.path.lexists(target)
    elif kind == "symlink-to-decoy":
        target = outside / "decoy.wav"
        target.write_bytes(b"precious bytes\n" * 100)
        os.chmod(target, 0o644)
        digest, mode = _sha256(target), os.stat(target).st_mode
        os.symlink(target, path)

        def check() -> None:
            assert os.readlink(path) == str(target)
            assert _sha256(target) == digest
            assert os.stat(target).st_mode == mode
    elif kind == "fifo":
        os.mkfifo(path, 0o644)

        def check() -> None:
            st = os.lstat(path)
            assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    elif kind == "directory":
        os.mkdir(path, 0o755)
        (Path(path) / "inside.wav").write_bytes(b"keep me")

        def check() -> None:
            assert os.path.isdir(path) and not os.path.islink(path)
            assert os.listdir(path) == ["inside.wav"]
            assert (Path(path) / "inside.wav").read_bytes() == b"keep me"
    else:
        raise AssertionError(kind)
    return check


@pytest.mark.parametrize("kind", ["dangling-symlink", "symlink-to-decoy", "fifo", "directory"])
def test_planted_thing_at_candidate_name_is_left_alone_and_a_new_file_is_made(
    active_dir, monkeypatch, tmp_path, kind
) -> None:
    planted_token = "0" * 32
    planted = f"{active_dir}/luna_audio_{planted_token}.wav"
    outside = tmp_path / "outside"
    outside.mkdir()
    still_intact = _plant(kind, planted, outside)
    given = force_first_token(monkeypatch, planted_token)

    path = get_temp_audio_path(create=True)

    assert given[0] == planted_token and len(given) == 2
    assert path == f"{active_dir}/luna_audio_{given[1]}.wav"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert stat.S_IMODE(st.st_mode) == 0o600
    still_intact()


def test_creation_gives_up_with_eexist_when_every_candidate_name_is_taken(
    private_dirs, monkeypatch
) -> None:
    taken = "f" * 32
    Path(f"{private_dirs.ram}/luna_audio_{taken}.wav").write_bytes(b"x")
    calls: list[int] = []

    def always_taken() -> str:
        calls.append(1)
        return taken

    monkeypatch.setattr(_newfile, "_new_token", always_taken)
    monkeypatch.setattr(_newfile, "_MAX_TRIES", 5)
    with pytest.raises(FileExistsError, match="no free temp file name") as info:
        get_temp_audio_path(create=True)
    assert info.value.errno == errno.EEXIST
    assert len(calls) == 5
    assert os.listdir(private_dirs.ram) == [f"luna_audio_{taken}.wav"]
