"""The luna-shm command line, run as a real `python -m luna_shm` process in private dirs."""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import luna_shm
from helpers import (
    LIBRARY_PATH,
    as_other_user,
    assert_child_ok,
    closed_and_readable_dirs,
    lock_held_by_a_stopped_process,
    require_tool,
    run_in_private_shm,
)
from luna_shm import AudioCache, _lowlevel, cli, demo, placement
from luna_shm.cli import parse_duration

STATUS_KEYS = {"version", "backend", "dir", "reason", "in_ram", "fs_type", "bytes_free",
               "bytes_total", "size_limited", "ram_dir", "fallback_dir", "files"}
GROUP_KEYS = {"dir", "prefix", "count", "bytes", "oldest_age_seconds", "held"}
DAY = 86400


def run_cli(dirs, *args: str, env: dict[str, str] | None = None,
            preexec_fn=None) -> subprocess.CompletedProcess[str]:
    """Run `python -m luna_shm ARGS` with the private dirs in its environment."""
    child_env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    child_env.update(LUNA_SHM_DIR=dirs.ram, TMPDIR=dirs.fallback, PYTHONPATH=LIBRARY_PATH)
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "luna_shm", *args], capture_output=True,
                          text=True, env=child_env, timeout=120, preexec_fn=preexec_fn)


def make_file(directory: str, prefix: str = "luna_audio_", size: int = 100,
              age: float = 0.0, suffix: str = ".wav") -> str:
    """Create a file of size bytes whose mtime is age seconds ago; return its path."""
    path = f"{directory}/{prefix}{uuid.uuid4().hex}{suffix}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


@contextmanager
def held_by_child(path: str) -> Iterator[None]:
    """A live child process holds a shared flock on path while the block runs."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_SH)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "locked"
        yield
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        child.stdout.close()


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The process exited with code and wrote exactly one line, no traceback, to stderr."""
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def status_json(dirs, **kwargs) -> dict:
    done = run_cli(dirs, "status", "--json", **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def group(status: dict, directory: str, prefix: str) -> dict:
    [found] = [g for g in status["files"] if g["dir"] == directory and g["prefix"] == prefix]
    return found


# ---- status --------------------------------------------------------------------------


def test_status_text_names_the_backend_capabilities_the_dir_and_why(private_dirs) -> None:
    done = run_cli(private_dirs, "status")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"memfd {'yes' if _lowlevel.HAS_MEMFD else 'no'}" in out
    assert f"O_TMPFILE {'yes' if _lowlevel.HAS_O_TMPFILE else 'no'}" in out
    assert f"dir:      {private_dirs.ram}\n" in out
    assert f"{private_dirs.ram} is a writable RAM disk" in out
    assert "in RAM:   yes (filesystem tmpfs)" in out


def test_status_json_is_one_object_with_the_documented_fields(private_dirs) -> None:
    status = status_json(private_dirs)
    assert set(status) == STATUS_KEYS
    assert status["version"] == luna_shm.__version__
    assert status["backend"] == {"module": "luna_shm._native", "memfd": _lowlevel.HAS_MEMFD,
                                 "o_tmpfile": _lowlevel.HAS_O_TMPFILE}
    assert (status["dir"], status["ram_dir"]) == (private_dirs.ram, private_dirs.ram)
    assert status["fallback_dir"] == private_dirs.fallback
    assert status["in_ram"] is True and status["fs_type"] == "tmpfs"
    assert 0 < status["bytes_free"] <= status["bytes_total"]
    assert status["size_limited"] is True
    assert all(set(g) == GROUP_KEYS for g in status["files"])


def test_status_counts_files_bytes_and_oldest_age_per_prefix_and_dir(private_dirs) -> None:
    make_file(private_dirs.ram, size=100, age=3600)
    make_file(private_dirs.ram, size=300, age=60)
    make_file(private_dirs.ram, prefix="luna_daemon_", size=7)
    make_file(private_dirs.fallback, size=50, age=2 * DAY)
    make_file(private_dirs.ram, prefix="someone_else_", size=1000, age=5 * DAY)

    status = status_json(private_dirs)

    audio = group(status, private_dirs.ram, "luna_audio_")
    assert (audio["count"], audio["bytes"], audio["held"]) == (2, 400, 0)
    assert 3600 <= audio["oldest_age_seconds"] < 4 * 3600
    daemon = group(status, private_dirs.ram, "luna_daemon_")
    assert (daemon["count"], daemon["bytes"]) == (1, 7)
    fallback = group(status, private_dirs.fallback, "luna_audio_")
    assert (fallback["count"], fallback["bytes"]) == (1, 50)
    assert 2 * DAY <= fallback["oldest_age_seconds"] < 3 * DAY
    empty = group(status, private_dirs.fallback, "luna_daemon_")
    assert (empty["count"], empty["bytes"], empty["oldest_age_seconds"]) == (0, 0, None)


def test_status_prints_a_dir_name_with_a_newline_escaped_on_one_line(private_dirs) -> None:
    # A name like that would otherwise forge a line of the report (clean escapes too).
    odd = f"{private_dirs.fallback}/new\nline"
    os.mkdir(odd, 0o700)
    done = run_cli(private_dirs, "status", env={"LUNA_SHM_DIR": odd})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert not any(line.startswith("line") for line in lines), done.stdout
    escaped = repr(odd)
    assert any(line.startswith(f"ram dir:  {escaped}") for line in lines), done.stdout


def test_status_counts_a_file_locked_by_a_live_child_process_as_held(private_dirs) -> None:
    held = make_file(private_dirs.ram)
    make_file(private_dirs.ram)
    with held_by_child(held):
        status = status_json(private_dirs)
    audio = group(status, private_dirs.ram, "luna_audio_")
    assert (audio["count"], audio["held"]) == (2, 1)


def test_status_does_not_take_away_the_lock_of_a_held_file(private_dirs) -> None:
    held = make_file(private_dirs.ram)
    with held_by_child(held):
        status_json(private_dirs)
        again = status_json(private_dirs)
    assert group(again, private_dirs.ram, "luna_audio_")["held"] == 1


def test_status_reports_the_fallback_dir_and_why_when_the_ram_disk_is_disabled(
        private_dirs) -> None:
    status = status_json(private_dirs, env={"LUNA_SHM_DISABLE": "1"})
    assert status["dir"] == private_dirs.fallback
    assert status["reason"] == "LUNA_SHM_DISABLE is set"
    assert status["in_ram"] == (status["fs_type"] in ("tmpfs", "ramfs"))


def test_status_explains_why_a_ram_dir_that_is_not_in_ram_is_refused(
        private_dirs, tmp_path: Path) -> None:
    disk_dir = tmp_path / "not_ram"
    disk_dir.mkdir()
    if _lowlevel.fs_probe(str(disk_dir)).is_ram_fs:
        pytest.skip("the test's tmp_path is itself on tmpfs here")
    status = status_json(private_dirs, env={"LUNA_SHM_DIR": str(disk_dir)})
    assert status["dir"] == private_dirs.fallback
    assert status["reason"].startswith(f"{disk_dir} is not a RAM disk")


# ---- clean ---------------------------------------------------------------------------


def test_clean_removes_our_unheld_files_lists_each_and_prints_the_total(private_dirs) -> None:
    paths = [make_file(private_dirs.ram, size=100), make_file(private_dirs.ram, size=200),
             make_file(private_dirs.fallback, prefix="luna_daemon_", size=300)]
    done = run_cli(private_dirs, "clean")
    assert done.returncode == 0, done.stderr
    for path in paths:
        assert f"removed {path} (" in done.stdout
        assert not os.path.exists(path)
    assert done.stdout.splitlines()[-1] == "removed 3 files, 600 B in total"


def test_clean_leaves_a_file_held_by_a_live_child_process(private_dirs) -> None:
    held = make_file(private_dirs.ram)
    free = make_file(private_dirs.ram)
    with held_by_child(held):
        done = run_cli(private_dirs, "clean")
    assert done.returncode == 0, done.stderr
    assert os.path.exists(held) and held not in done.stdout
    assert not os.path.exists(free) and free in done.stdout


def test_clean_leaves_files_that_are_not_ours(private_dirs) -> None:
    other = make_file(private_dirs.ram, prefix="someone_else_")
    our_named_dir = f"{private_dirs.ram}/luna_audio_{uuid.uuid4().hex}"
    os.mkdir(our_named_dir)
    done = run_cli(private_dirs, "clean")
    assert done.returncode == 0, done.stderr
    assert os.path.exists(other) and os.path.isdir(our_named_dir)
    assert done.stdout == "removed 0 files, 0 B in total\n"


def test_clean_dry_run_lists_files_and_removes_nothing(private_dirs) -> None:
    paths = [make_file(private_dirs.ram), make_file(private_dirs.fallback)]
    done = run_cli(private_dirs, "clean", "--dry-run")
    assert done.returncode == 0, done.stderr
    for path in paths:
        assert f"would remove {path} (" in done.stdout
        assert os.path.exists(path)
    assert done.stdout.splitlines()[-1] == (
        "would remove 2 files, 200 B in total (dry run: nothing was removed)")


def test_clean_dry_run_lists_exactly_what_clean_then_removes(private_dirs) -> None:
    make_file(private_dirs.ram, age=2 * DAY)
    make_file(private_dirs.fallback, prefix="luna_daemon_", age=2 * DAY)
    make_file(private_dirs.ram)  # too recent for --older-than 1d
    held = make_file(private_dirs.ram, age=2 * DAY)
    with held_by_child(held):
        dry = run_cli(private_dirs, "clean", "--dry-run", "--older-than", "1d")
        real = run_cli(private_dirs, "clean", "--older-than", "1d")
    listed = [line.split()[2] for line in dry.stdout.splitlines()[:-1]]
    removed = [line.split()[1] for line in real.stdout.splitlines()[:-1]]
    assert len(listed) == 2
    assert sorted(listed) == sorted(removed)


@pytest.mark.parametrize("older_than", ["90s", "10m", "2h", "3600", "1.5h", "1d"])
def test_clean_older_than_removes_only_files_last_modified_longer_ago(
        private_dirs, older_than: str) -> None:
    old = make_file(private_dirs.ram, age=3 * DAY)
    recent = make_file(private_dirs.ram, age=30)
    done = run_cli(private_dirs, "clean", "--older-than", older_than)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(old)
    assert os.path.exists(recent)


# ---- odd names and unreadable dirs --------------------------------------------------

_FORGED = "\nremoved 0 files, 0 B in total"


def make_odd_files(directory: str) -> dict[bytes, str]:
    """Our files with an undecodable byte and a newline in their names, and a plain one;
    return {name as bytes: how clean must print the path}."""
    token = uuid.uuid4().hex
    names = {
        f"luna_audio_{token}\xff.wav".encode("latin-1"):
            f"'{directory}/luna_audio_{token}\\xff.wav'",
        f"luna_audio_{token}{_FORGED}.wav".encode():
            f"'{directory}/luna_audio_{token}\\nremoved 0 files, 0 B in total.wav'",
        f"luna_daemon_{token}.wav".encode(): f"{directory}/luna_daemon_{token}.wav",
    }
    for name in names:
        fd = os.open(os.fsencode(directory) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600)
        os.write(fd, b"\0" * 10)
        os.close(fd)
    return names


@pytest.mark.parametrize("dry_run", [False, True], ids=["clean", "dry-run"])
def test_clean_prints_odd_names_escaped_one_line_each_and_finishes_on_a_utf8_terminal(
        private_dirs, dry_run) -> None:
    names = make_odd_files(private_dirs.ram)
    args = ["clean", "--dry-run"] if dry_run else ["clean"]
    done = run_cli(private_dirs, *args, env={"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    verb = "would remove" if dry_run else "removed"
    assert len(lines) == 4
    assert sorted(line.rsplit(" (", 1)[0] for line in lines[:3]) == sorted(
        f"{verb} {shown}" for shown in names.values())
    assert lines[3].startswith(f"{verb} 3 files, 30 B in total")
    left = sorted(os.listdir(os.fsencode(private_dirs.ram)))
    assert left == (sorted(names) if dry_run else [])


def test_clean_through_main_on_a_strict_utf8_stream_lists_every_odd_name(
        private_dirs, monkeypatch) -> None:
    names = make_odd_files(private_dirs.ram)
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n")
    monkeypatch.setattr(sys, "stdout", stream)
    assert cli.main(["clean"]) == 0
    stream.flush()
    lines = raw.getvalue().decode("utf-8").splitlines()
    assert sorted(line.rsplit(" (", 1)[0] for line in lines[:-1]) == sorted(
        f"removed {shown}" for shown in names.values())
    assert lines[-1] == "removed 3 files, 30 B in total"
    assert os.listdir(private_dirs.ram) == []


def test_shown_escapes_what_the_output_encoding_cannot_take() -> None:
    assert cli.shown("/dev/shm/café.wav") == "/dev/shm/café.wav"
    assert cli.shown("/dev/shm/café.wav", "ascii") == "'/dev/shm/caf\\xe9.wav'"
    assert cli.shown("a\tb\x1b[2J\u200b") == "'a\\tb\\x1b[2J\\u200b'"
    assert cli.shown("'quoted") == "'\\'quoted'"


def _cli_as_other_user(closed: str, readable: str) -> dict[str, object]:
    """In a forked child that became uid 65534: status and clean with an unreadable RAM dir."""
    os.environ.update(LUNA_SHM_DIR=closed, TMPDIR=readable)
    placement.refresh()
    made = make_file(readable)
    result: dict[str, object] = {}
    for command in ("status", "clean"):
        out, err = io.StringIO(), io.StringIO()
        sys.stdout, sys.stderr = out, err
        try:
            code = cli.main([command])
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        result[command] = [code, out.getvalue().splitlines()[-1:], err.getvalue()]
    result["file_left"] = os.path.exists(made)
    return result


def test_status_and_clean_report_an_unreadable_dir_in_one_line_with_exit_code_1(
        private_dirs) -> None:
    closed, readable = closed_and_readable_dirs(private_dirs.ram)
    result = as_other_user(_cli_as_other_user, closed, readable)
    assert isinstance(result, dict)
    error = f"[Errno {errno.EACCES}] Permission denied: '{closed}'\n"
    assert result["status"] == [1, [], f"luna-shm status: error: {error}"]
    assert result["clean"] == [1, ["removed 1 file, 100 B in total"],
                               f"luna-shm clean: error: {error}"]
    assert result["file_left"] is False


# ---- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("3600", 3600.0), ("1d", 86400.0),
    ("0", 0.0), ("1.5h", 5400.0), (" 10M ", 600.0),
])
def test_parse_duration_reads_a_number_with_an_optional_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "-5m", "1.2.3", "m", "10 minutes"])
def test_parse_duration_rejects_anything_else_naming_the_text(text: str) -> None:
    with pytest.raises(ValueError, match=f"invalid duration {text!r}"):
        parse_duration(text)


@pytest.mark.parametrize("value", ["ten", "10x", "-5m", ""])
def test_a_bad_older_than_is_one_line_on_stderr_and_exit_code_2(
        private_dirs, value: str) -> None:
    kept = make_file(private_dirs.ram)
    line = assert_one_error_line(run_cli(private_dirs, "clean", f"--older-than={value}"), 2)
    assert line.startswith("luna-shm clean: error: argument --older-than: invalid duration")
    assert os.path.exists(kept)


@pytest.mark.parametrize("args", [["frobnicate"], [], ["status", "--bogus"],
                                  ["clean", "--older-than"], ["demo", "extra"]])
def test_bad_arguments_are_one_line_on_stderr_and_exit_code_2(private_dirs, args) -> None:
    line = assert_one_error_line(run_cli(private_dirs, *args), 2)
    assert line.startswith("luna-shm") and ": error: " in line and "--help" in line


@pytest.mark.parametrize("command", [[], ["status"], ["clean"], ["demo"]])
def test_every_command_has_help(private_dirs, command: list[str]) -> None:
    done = run_cli(private_dirs, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: luna-shm {' '.join(command)}".rstrip())


def test_version_prints_the_package_version(private_dirs) -> None:
    done = run_cli(private_dirs, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"luna-shm {luna_shm.__version__}\n"


def test_console_script_runs_the_same_command_line(private_dirs) -> None:
    script = Path(sys.executable).parent / "luna-shm"
    if not script.exists():
        pytest.skip(f"no luna-shm console script next to {sys.executable} (not installed)")
    env = {**os.environ, "LUNA_SHM_DIR": private_dirs.ram, "TMPDIR": private_dirs.fallback}
    done = subprocess.run([str(script), "status", "--json"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dir"] == private_dirs.ram


# ---- demo and failures -----------------------------------------------------------------


def test_demo_verifies_every_sample_and_leaves_both_dirs_empty(private_dirs) -> None:
    done = run_cli(private_dirs, "demo")
    assert done.returncode == 0, done.stderr
    assert "every sample matches" in done.stdout
    # The disk column ran in $TMPDIR, the library's fallback dir, not in /tmp.
    assert f"(RAM disk: {private_dirs.ram}; disk temp dir: {private_dirs.fallback})" in done.stdout
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []


def _luna_shm_names_used(tree: ast.Module) -> list[str]:
    """Every name demo.py takes from luna_shm: `from luna_shm[.x] import name` as
    "[x.]name", `import luna_shm[.x]` as "[x]", and `luna_shm.name` as "name"."""
    used, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or "luna_shm" in (node.module or "")):
            sub = (node.module or ".").removeprefix("luna_shm").lstrip(".")
            used += [f"{sub}.{alias.name}" if sub or node.level else alias.name
                     for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "luna_shm":
                    aliases.add(alias.asname or alias.name)
                elif alias.name.startswith("luna_shm."):
                    used.append(alias.name.removeprefix("luna_shm."))
    used += [node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Name) and node.value.id in aliases]
    return used


def test_demo_uses_only_names_that_luna_shm_exports() -> None:
    tree = ast.parse(Path(demo.__file__).read_text(encoding="utf-8"))
    used = _luna_shm_names_used(tree)
    assert used, "demo.py takes nothing from luna_shm: the check would pass vacuously"
    assert [name for name in used if name not in luna_shm.__all__] == []


def test_the_public_api_check_sees_private_imports() -> None:
    tree = ast.parse("from luna_shm import _newfile, read_wav\n"
                     "from luna_shm.placement import current\n"
                     "import luna_shm.temp_audio\n"
                     "import luna_shm as ls\n"
                     "ls.placement.current()\n")
    used = _luna_shm_names_used(tree)
    assert [n for n in used if n not in luna_shm.__all__] == [
        "_newfile", "placement.current", "temp_audio", "placement"]


def test_demo_without_espeak_ng_uses_a_tone_and_says_why(private_dirs, tmp_path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = run_cli(private_dirs, "demo", env={"PATH": str(empty)})
    assert done.returncode == 0, done.stderr
    assert "from a 440 Hz tone (espeak-ng is not installed)" in done.stdout
    assert "every sample matches" in done.stdout
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []


def test_demo_with_a_failing_espeak_ng_tries_both_dirs_then_uses_a_tone(
        private_dirs, tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "espeak-ng"
    fake.write_text("#!/bin/sh\necho 'espeak-ng: no voice here' >&2\nexit 3\n")
    fake.chmod(0o755)
    done = run_cli(private_dirs, "demo", env={"PATH": str(bin_dir)})
    assert done.returncode == 0, done.stderr
    assert (f"from a 440 Hz tone (espeak-ng is installed but failed in {private_dirs.ram} ("
            in done.stdout)
    assert (f"bytes free): espeak-ng exited with 3: espeak-ng: no voice here; in "
            f"{private_dirs.fallback}: espeak-ng exited with 3: espeak-ng: no voice here)"
            in done.stdout)
    assert "every sample matches" in done.stdout
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []


def test_demo_with_the_ram_disk_disabled_says_where_the_first_column_ran(
        private_dirs) -> None:
    done = run_cli(private_dirs, "demo", env={"LUNA_SHM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr
    assert f"luna_shm demo: temp dir {private_dirs.fallback} (" in done.stdout
    assert "every sample matches" in done.stdout
    # "(no RAM disk in use: the first column ran in X; ...", or "(RAM disk: X; ..." when
    # the fallback dir is itself a tmpfs.
    assert f"{private_dirs.fallback}; disk temp dir: {private_dirs.fallback})" in done.stdout
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []


def test_demo_on_a_full_ram_disk_falls_back_to_the_disk_and_says_why(tmp_path) -> None:
    require_tool("espeak-ng")
    done = run_in_private_shm("""
        import subprocess, sys
        subprocess.run(["dd", "if=/dev/zero", "of=/dev/shm/filler", "bs=4k", "count=64"],
                       capture_output=True)  # fills the 64 KiB RAM disk (dd then fails)
        from luna_shm import cli
        code = cli.main(["demo"])
        import os
        print("ours left:", [n for d in ("/dev/shm", "/tmp") for n in os.listdir(d)
                             if "luna_" in n])
        sys.exit(code)
    """, shm_size="64k")
    out = assert_child_ok(done)
    assert "not installed" not in out
    assert "from espeak-ng: 'Hello from luna shm." in out
    assert "written to /tmp because it failed in /dev/shm (0 bytes free)" in out
    assert "every sample matches" in out
    assert "the RAM disk /dev/shm has no room for" in out and "ran in /tmp" in out
    assert "ours left: []" in out
    assert "Errno" not in done.stderr


def _small_file_size_limit() -> None:
    """In the child: files may not grow past 4 KiB (EFBIG; Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_failing_command_is_one_line_on_stderr_exit_code_1_and_no_traceback(
        private_dirs) -> None:
    done = run_cli(private_dirs, "demo", preexec_fn=_small_file_size_limit)
    line = assert_one_error_line(done, 1)
    assert line.startswith(f"luna-shm demo: error: [Errno {errno.EFBIG}]")
    assert os.listdir(private_dirs.ram) == []


def _cli_outputs(ram: str, disk: str) -> dict[str, object]:
    os.environ.update(LUNA_SHM_DIR=ram, TMPDIR=disk)
    placement.refresh()
    result: dict[str, object] = {}
    for name, args in (("status", ["status", "--json"]),
                       ("dry", ["clean", "--dry-run"]), ("clean", ["clean"])):
        out = io.StringIO()
        sys.stdout = out
        try:
            result[name] = [cli.main(args), out.getvalue()]
        finally:
            sys.stdout = sys.__stdout__
    return result


def _status_and_clean_as_nobody(ram: str, disk: str) -> dict:
    """status --json, clean --dry-run and clean, run by cli.main in a forked child that
    became uid 65534 with ram and disk as its dirs; their outputs."""
    result = as_other_user(_cli_outputs, ram, disk)
    assert isinstance(result, dict)
    return result


def test_status_counts_exactly_the_files_clean_removes_or_leaves_held(private_dirs) -> None:
    # status and clean share one scan: the files status counts and does not call held
    # are the files clean removes. Run as a second user (uid 65534) so that a file of
    # its own it cannot open (mode 000) is in the mix: clean cannot examine it, so
    # status must not count it either.
    if os.geteuid() != 0:
        pytest.skip("needs root to fork a child that becomes uid 65534")
    os.chmod(private_dirs.ram, 0o711)
    ram, disk = f"{private_dirs.ram}/ram", f"{private_dirs.ram}/disk"
    for directory in (ram, disk):
        os.mkdir(directory, 0o700)
        os.chown(directory, 65534, 65534)
    token = uuid.uuid4().hex
    unused = make_file(ram)
    held = make_file(ram)
    partial = make_file(ram, prefix=".luna_audio_.partial_", suffix="")
    daemon = make_file(disk, prefix="luna_daemon_")
    unreadable = make_file(ram)
    for path in (unused, held, partial, daemon, unreadable):
        os.chown(path, 65534, 65534)
    os.chmod(unreadable, 0o000)
    roots = make_file(ram)  # another user's file (root's)
    os.symlink(unused, f"{ram}/luna_audio_{token}_link.wav")
    os.mkfifo(f"{ram}/luna_audio_{token}.fifo")
    with held_by_child(held):
        out = _status_and_clean_as_nobody(ram, disk)
    assert [out[k][0] for k in ("status", "dry", "clean")] == [0, 0, 0], out
    status = json.loads(out["status"][1])
    listed = sorted(line.split()[2] for line in out["dry"][1].splitlines()[:-1])
    removed = sorted(line.split()[1] for line in out["clean"][1].splitlines()[:-1])
    assert listed == removed == sorted([unused, partial, daemon])
    counted = sum(g["count"] for g in status["files"])
    held_count = sum(g["held"] for g in status["files"])
    assert (counted, held_count) == (4, 1)
    assert counted - held_count == len(removed)
    assert group(status, ram, "luna_audio_")["count"] == 3  # unused, held, the partial
    assert group(status, disk, "luna_daemon_")["count"] == 1
    assert os.path.exists(held) and os.path.exists(unreadable) and os.path.exists(roots)


@pytest.mark.parametrize("command", [["status"], ["clean", "--dry-run"], ["clean"]])
def test_a_reader_that_goes_away_ends_the_command_quietly_with_141(private_dirs,
                                                                  command) -> None:
    # `luna-shm clean | head -1`: the pipe's reader is gone before the output is written.
    for _ in range(3000):  # more output than a pipe buffer and stdout's own buffer hold
        make_file(private_dirs.ram)
    child_env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    child_env.update(LUNA_SHM_DIR=private_dirs.ram, TMPDIR=private_dirs.fallback,
                     PYTHONPATH=LIBRARY_PATH)
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run([sys.executable, "-m", "luna_shm", *command], stdout=writer,
                              stderr=subprocess.PIPE, text=True, env=child_env, timeout=120)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("command", [["status"], ["clean"], ["cache", "stats"]])
def test_a_command_run_with_stdout_closed_does_its_job_with_no_traceback(private_dirs,
                                                                       command) -> None:
    # `luna-shm clean >&-` from a cron job or a daemon's service file: Python starts
    # with sys.stdout None. The command still runs (its listing goes nowhere, as print's
    # does then) and exits 0, with nothing on stderr.
    made = make_file(private_dirs.ram)
    AudioCache("default").close()
    done = run_cli(private_dirs, *command, preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (0, "")
    assert os.path.exists(made) == (command != ["clean"])


@pytest.mark.parametrize("action", ["stats", "ls", "clear"])
def test_cache_commands_on_a_cache_that_does_not_exist_say_so_and_make_nothing(
        private_dirs, action) -> None:
    # A typo in --name (tts-cache for tts_cache) must not report an empty cache, or
    # "removed 0 entries", and leave a new cache directory behind.
    AudioCache("tts_cache").close()
    before = sorted(os.listdir(private_dirs.ram))
    done = run_cli(private_dirs, "cache", action, "--name", "tts-cache")
    line = assert_one_error_line(done, 1)
    assert line == (f"luna-shm cache: error: no cache named 'tts-cache' in "
                    f"{private_dirs.ram}")
    assert done.stdout == ""
    assert sorted(os.listdir(private_dirs.ram)) == before


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "x" * 65])
def test_cache_commands_refuse_a_name_no_cache_can_have_naming_it(private_dirs, name) -> None:
    # Not "no cache named '../x'", which reads as a cache that merely does not exist.
    AudioCache("default").close()
    before = sorted(os.listdir(private_dirs.ram))
    done = run_cli(private_dirs, "cache", "ls", "--name", name)
    line = assert_one_error_line(done, 1)
    assert line == ("luna-shm cache: error: name must be 1 to 64 characters of A-Z, a-z, "
                    f"0-9, '.', '_' or '-' (not starting with '.'), got {name!r}")
    assert sorted(os.listdir(private_dirs.ram)) == before


@pytest.mark.parametrize("action", ["stats", "ls", "clear"])
def test_cache_commands_give_up_on_a_lock_a_stopped_process_holds_after_their_timeout(
        private_dirs, action) -> None:
    with AudioCache("held") as cache:
        cache.put(luna_shm.cache_key("kept"), np.zeros(100, np.int16), 16000).release()
        lock = f"{cache.directory}/lock"
    with lock_held_by_a_stopped_process(lock):
        # Found in review: the command waited for the stopped holder for ever.
        done = run_cli(private_dirs, "cache", action, "--name", "held", "--timeout", "0.1")
        line = assert_one_error_line(done, 1)
        assert line == (f"luna-shm cache: error: [Errno {errno.ETIMEDOUT}] gave up after "
                        "0.1 s (--timeout) waiting for the lock of cache 'held': another "
                        f"process holds it (stopped or hung?): '{lock}'")
        assert done.stdout == ""
    assert run_cli(private_dirs, "cache", action, "--name", "held").returncode == 0


def test_cache_commands_wait_for_the_cache_s_lock_for_10_seconds_by_default(
        private_dirs) -> None:
    with AudioCache("held") as cache:
        lock = f"{cache.directory}/lock"
    with lock_held_by_a_stopped_process(lock):
        # run_cli's own deadline (120 s) fails the test if it hangs, as it did.
        done = run_cli(private_dirs, "cache", "stats", "--name", "held", "--json")
    assert "gave up after 10 s (--timeout)" in assert_one_error_line(done, 1)
    helped = run_cli(private_dirs, "cache", "--help")
    assert "--timeout SECONDS" in helped.stdout and "(default: 10)" in helped.stdout
    for bad in ("soon", "-1"):
        done = run_cli(private_dirs, "cache", "stats", "--name", "held", "--timeout", bad)
        assert done.returncode == 2 and "--timeout" in done.stderr


def test_cache_ls_escapes_a_path_its_output_encoding_cannot_take(private_dirs,
                                                                 monkeypatch) -> None:
    # status and clean print such a path escaped; cache ls failed with a
    # UnicodeEncodeError on an ASCII stdout (a service's PYTHONIOENCODING, LANG=C).
    ram = f"{private_dirs.ram}/caf\u00e9"
    os.mkdir(ram, 0o700)
    monkeypatch.setenv("LUNA_SHM_DIR", ram)
    placement.refresh()
    with AudioCache("odd") as cache:
        key = luna_shm.cache_key("bonjour")
        cache.put(key, np.zeros(100, np.int16), 16000).release()
    done = run_cli(private_dirs, "cache", "ls", "--name", "odd",
                   env={"LUNA_SHM_DIR": ram, "PYTHONIOENCODING": "ascii"})
    assert (done.returncode, done.stderr) == (0, "")
    [line] = done.stdout.splitlines()
    assert line.startswith(key)
    assert line.endswith(f" '{private_dirs.ram}/caf\\xe9/luna_cache-{os.geteuid()}-odd/"
                         f"{key}.wav'")


def test_cache_stats_does_not_report_its_own_max_bytes_as_the_caches(private_dirs) -> None:
    # The bound is each opener's own setting (the daemon's AudioCache(max_bytes=...)),
    # kept nowhere the command could read: it printed its own 256 MiB default instead.
    with AudioCache("small", max_bytes=1000):
        stats = json.loads(run_cli(private_dirs, "cache", "stats", "--name", "small",
                                   "--json").stdout)
        text = run_cli(private_dirs, "cache", "stats", "--name", "small").stdout
    assert stats["max_bytes"] is None
    assert "max_bytes: unknown (each process that opens the cache sets its own)" in text
    assert str(256 * 1024 * 1024) not in text


def test_one_dir_named_two_ways_is_counted_listed_and_cleaned_once(private_dirs) -> None:
    # LUNA_SHM_DIR through a symlinked parent, TMPDIR the same dir by its own name.
    alias = f"{private_dirs.ram}/alias"
    os.symlink(os.path.dirname(private_dirs.fallback), alias)
    spelled = f"{alias}/{os.path.basename(private_dirs.fallback)}"
    files = [make_file(private_dirs.fallback) for _ in range(3)]
    env = {"LUNA_SHM_DIR": spelled}
    status = json.loads(run_cli(private_dirs, "status", "--json", env=env).stdout)
    assert sum(g["count"] for g in status["files"]) == 3
    dry = run_cli(private_dirs, "clean", "--dry-run", env=env)
    assert dry.returncode == 0 and len(dry.stdout.splitlines()) == 3 + 1  # and the total
    clean = run_cli(private_dirs, "clean", env=env)
    assert clean.returncode == 0 and len(clean.stdout.splitlines()) == 3 + 1
    assert not any(os.path.exists(path) for path in files)


def test_cache_clear_with_disk_dir_removes_the_disk_tier_s_entries_too(private_dirs,
                                                                      tmp_path) -> None:
    # Found: `luna-shm cache clear` opened the cache without its disk tier, so the
    # entries spilled there stayed, and the next get reloaded the "cleared" audio
    # (stats counted no disk entry either). --disk-dir names the tier.
    disk = tmp_path / "disk"
    disk.mkdir()
    keys = [luna_shm.cache_key(f"disk {i}") for i in range(3)]
    with AudioCache("tiered", max_bytes=3000, disk_dir=disk) as cache:
        for i, key in enumerate(keys):  # 2 KB each: each put spills the one before
            cache.put(key, np.full(1000, i, np.int16), 8000).release()
        assert cache.stats().disk_entries == 2
        stats = json.loads(run_cli(private_dirs, "cache", "stats", "--name", "tiered",
                                   "--disk-dir", str(disk), "--json").stdout)
        assert (stats["entries"], stats["disk_entries"]) == (1, 2)
        done = run_cli(private_dirs, "cache", "clear", "--name", "tiered",
                       "--disk-dir", str(disk))
        assert (done.returncode, done.stderr) == (0, "")
        assert "removed 3 entries from cache 'tiered'" in done.stdout
        assert [cache.get(key) for key in keys] == [None] * 3
        assert (cache.stats().entries, cache.stats().disk_entries) == (0, 0)
        cache.destroy()


def test_cache_commands_with_a_disk_dir_that_holds_no_tier_of_the_cache_say_so(
        private_dirs, tmp_path) -> None:
    # A mistyped --disk-dir must not report an empty tier and leave a new one behind.
    AudioCache("tiered").close()
    disk = tmp_path / "disk"
    disk.mkdir()
    done = run_cli(private_dirs, "cache", "clear", "--name", "tiered",
                   "--disk-dir", str(disk))
    line = assert_one_error_line(done, 1)
    assert line == f"luna-shm cache: error: no disk tier of cache 'tiered' in {disk}"
    assert os.listdir(disk) == []
