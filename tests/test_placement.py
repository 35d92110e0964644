"""Where temp audio goes: RAM detection on real mounts, overrides, fallbacks and their log.

In-process tests use the private_dirs fixture. Tests about /dev/shm itself run
in a child with its own mount namespace (helpers.run_in_private_shm), where
/dev/shm and /tmp are fresh private tmpfs mounts: the machine's are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import luna_shm
from helpers import (
    FILL_FD_TABLE,
    KEPT_IN_TMP,
    LIBRARY_PATH,
    LIST_PRIVATE_TMP,
    as_other_user,
    assert_child_ok,
    call_with_deadline,
    child_take_every_inode,
    child_tmp_as_symlink,
    child_tmp_on_disk,
    run_in_private_shm,
)
from luna_shm import placement
from luna_shm.temp_audio import get_temp_audio_path

RAM_FS_NAMES = {"tmpfs", "ramfs"}


def statfs_type(path: str | Path) -> str:
    """The filesystem type statfs reports for path, from coreutils (an independent oracle)."""
    done = subprocess.run(["stat", "-f", "-c", "%T", str(path)],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def mount_fs_type(mountpoint: str) -> str | None:
    """The type of the topmost mount at mountpoint, from util-linux findmnt; None if none."""
    done = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", mountpoint],
                          capture_output=True, text=True)
    lines = done.stdout.split()
    return lines[-1] if lines else None


def require_disk_dir(path: str | Path) -> None:
    if statfs_type(path) in RAM_FS_NAMES:
        pytest.skip(f"{path} is itself on a RAM filesystem here; a disk dir is needed")


def luna_records(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "luna_shm" and fragment in r.getMessage()]


def disk_tmp_preamble(disk: Path) -> str:
    """Child code that replaces its private tmpfs /tmp by a bind mount of a private disk dir."""
    return child_tmp_on_disk(disk)


def disk_listing(disk: Path) -> list[str]:
    """What a child left in the disk dir that stood in for its /tmp (sorted), apart from
    the mount points of the checkout or interpreter bound back in (child_tmp_on_disk)."""
    return sorted(set(os.listdir(disk)) - set(KEPT_IN_TMP))


def child_report() -> str:
    return textwrap.dedent("""
        import json, os, logging, sys
        from luna_shm import placement
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append([record.levelname, record.getMessage()])
        logging.getLogger("luna_shm").addHandler(Keep())
        logging.getLogger("luna_shm").setLevel(logging.DEBUG)
        import luna_shm
        def report(**extra):
            print(json.dumps(dict(
                temp_dir=luna_shm.temp_dir(), in_ram=luna_shm.is_using_ram_disk(),
                shm=sorted(os.listdir("/dev/shm")), log=records, **extra)))
    """)


# ---- RAM detection on real filesystems ---------------------------------------------------


def test_private_tmpfs_dir_is_a_ram_disk(private_dirs) -> None:
    assert statfs_type(private_dirs.ram) == "tmpfs"
    assert placement.lives_in_ram(private_dirs.ram) is True
    assert luna_shm.is_using_ram_disk() is True
    assert luna_shm.temp_dir() == private_dirs.ram


def test_disk_fallback_dir_under_pytest_tmp_path_is_not_a_ram_disk(private_dirs) -> None:
    require_disk_dir(private_dirs.fallback)
    assert placement.lives_in_ram(private_dirs.fallback) is False


def test_dev_on_devtmpfs_is_not_a_ram_disk_although_statfs_says_tmpfs() -> None:
    if mount_fs_type("/dev") != "devtmpfs":
        pytest.skip("/dev is not a devtmpfs mount here")
    assert placement.lives_in_ram("/dev") is False


@pytest.mark.parametrize("kind", ["missing", "regular-file"])
def test_what_is_not_a_directory_is_not_a_ram_disk(private_dirs, kind) -> None:
    path = f"{private_dirs.ram}/thing"
    if kind == "regular-file":
        Path(path).write_bytes(b"")
    assert placement.lives_in_ram(path) is False


def test_ramfs_mount_is_a_ram_disk() -> None:
    done = run_in_private_shm(
        textwrap.dedent("""
            import os, subprocess
            os.mkdir("/tmp/ramfs")
            subprocess.run(["mount", "-t", "ramfs", "-o", "mode=700", "ramfs", "/tmp/ramfs"],
                           check=True)
            os.environ["LUNA_SHM_DIR"] = "/tmp/ramfs"
        """) + child_report() + textwrap.dedent("""
            path = luna_shm.get_temp_audio_path(create=True)
            report(path=path, fs=subprocess.run(["stat", "-f", "-c", "%T", "/tmp/ramfs"],
                   capture_output=True, text=True).stdout.strip())
        """)
    )
    out = json.loads(assert_child_ok(done))
    assert out["fs"] == "ramfs"
    assert out["temp_dir"] == "/tmp/ramfs"
    assert out["in_ram"] is True
    assert out["path"].startswith("/tmp/ramfs/luna_audio_")


def test_default_dir_is_dev_shm_on_a_private_tmpfs_mount() -> None:
    done = run_in_private_shm(child_report() + textwrap.dedent("""
        path = luna_shm.get_temp_audio_path(create=True)
        report(path=path, is_file=os.path.isfile(path))
    """))
    out = json.loads(assert_child_ok(done))
    assert out["temp_dir"] == "/dev/shm"
    assert out["in_ram"] is True
    assert out["path"].startswith("/dev/shm/luna_audio_") and out["is_file"]
    assert out["shm"] == [os.path.basename(out["path"])]
    assert out["log"] == []


def test_bare_dev_shm_directory_on_devtmpfs_is_not_a_ram_disk() -> None:
    # Unmount every tmpfs stacked on /dev/shm (in the child's namespace only) so
    # that /dev/shm is the plain directory on devtmpfs: statfs says "tmpfs", but it
    # is the kernel's device fs, not a RAM disk. Only names are asked for
    # (create=False): nothing is written to the real devtmpfs.
    done = run_in_private_shm(
        textwrap.dedent("""
            import json, subprocess, sys
            for _ in range(32):
                if subprocess.run(["umount", "/dev/shm"], capture_output=True).returncode:
                    break
            kind = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", "/dev/shm"],
                                  capture_output=True, text=True).stdout.split()
            if kind[-1:] != ["devtmpfs"]:
                print(json.dumps({"skip": f"/dev/shm lies on {kind} here, not on devtmpfs"}))
                sys.exit(0)
        """) + child_report() + textwrap.dedent("""
            path = luna_shm.get_temp_audio_path(create=False)
            report(path=path, lives=placement.lives_in_ram("/dev/shm"))
        """)
    )
    out = json.loads(assert_child_ok(done))
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["lives"] is False
    assert out["temp_dir"] == "/tmp"
    assert out["path"].startswith("/tmp/luna_audio_")
    # Named by its mount's type: its statfs magic is tmpfs's own, 0x1021994, which said
    # "tmpfs" to whoever read the message (found in session 22).
    assert any("/dev/shm is not a RAM disk (filesystem devtmpfs)" in message
               for _, message in out["log"])


# ---- overrides -------------------------------------------------------------------------------


@pytest.mark.parametrize("fallback_fs", ["disk", "tmpfs"])
def test_disable_sends_files_to_fallback_dir_and_reports_its_real_filesystem(
    private_dirs, monkeypatch, caplog, fallback_fs
) -> None:
    caplog.set_level(logging.INFO, logger="luna_shm")
    if fallback_fs == "tmpfs":
        fallback = f"{private_dirs.ram}/fallback_on_tmpfs"
        os.mkdir(fallback, 0o700)
        monkeypatch.setenv("TMPDIR", fallback)
    else:
        fallback = private_dirs.fallback
        require_disk_dir(fallback)
    monkeypatch.setenv("LUNA_SHM_DISABLE", "1")

    path = get_temp_audio_path(create=True)

    assert os.path.dirname(path) == fallback
    assert luna_shm.temp_dir() == fallback
    assert luna_shm.is_using_ram_disk() is (statfs_type(fallback) in RAM_FS_NAMES)
    assert luna_shm.is_using_ram_disk() is (fallback_fs == "tmpfs")
    assert len(luna_records(caplog, "LUNA_SHM_DISABLE is set")) == 1


def test_luna_shm_dir_names_the_ram_dir_to_use(private_dirs, monkeypatch) -> None:
    chosen = f"{private_dirs.ram}/chosen"
    os.mkdir(chosen, 0o700)
    monkeypatch.setenv("LUNA_SHM_DIR", chosen)
    path = get_temp_audio_path(create=True)
    assert os.path.dirname(path) == chosen
    assert luna_shm.is_using_ram_disk() is True


@pytest.mark.parametrize("which", ["LUNA_SHM_DIR", "TMPDIR"])
def test_a_relative_dir_is_resolved_once_and_an_os_chdir_afterwards_changes_nothing(
    private_dirs, monkeypatch, tmp_path, which
) -> None:
    if which == "TMPDIR":
        monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
        target = private_dirs.fallback
    else:
        target = private_dirs.ram
    parent, name = os.path.split(target)
    monkeypatch.chdir(parent)
    monkeypatch.setenv(which, name)
    assert luna_shm.refresh_temp_dir() == target
    first = get_temp_audio_path(create=True)

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / name).mkdir(parents=True)  # the same relative name, resolved anew, exists
    monkeypatch.chdir(elsewhere)

    assert luna_shm.temp_dir() == target
    assert target in placement.our_dirs()
    second = get_temp_audio_path(create=True)
    assert os.path.dirname(first) == os.path.dirname(second) == target
    assert luna_shm.cleanup_temp_audio(first) is True
    assert luna_shm.cleanup_all_temp_audio() == 1
    assert os.listdir(target) == []
    assert os.listdir(elsewhere / name) == []


def test_a_relative_luna_shm_dir_in_a_deleted_working_directory_falls_back_and_says_why(
        private_dirs, tmp_path) -> None:
    # A daemon started in a directory that was removed since: a relative LUNA_SHM_DIR
    # cannot be resolved (os.getcwd fails). Every call raised a bare FileNotFoundError.
    # -P keeps "" (the working directory) off sys.path: with it there, CPython 3.13.0-3.13.2
    # fail any missing module attribute in a removed working directory with SystemError
    # (python/cpython#130932), and the stdlib's own `import socket` does one.
    gone = tmp_path / "gone"
    gone.mkdir()
    code = textwrap.dedent(f"""
        import json, os, sys
        os.chdir({str(gone)!r})
        os.rmdir({str(gone)!r})
        import luna_shm
        from luna_shm import cli, placement
        path = luna_shm.get_temp_audio_path(create=True)
        where = placement.current()
        removed = luna_shm.cleanup_all_temp_audio()
        print(json.dumps([os.path.dirname(path), where.reason, removed, cli.main(["status"])]))
    """)
    env = {**os.environ, "LUNA_SHM_DIR": "rel", "TMPDIR": private_dirs.fallback,
           "PYTHONPATH": LIBRARY_PATH}
    env.pop("LUNA_SHM_DISABLE", None)
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    directory, reason, removed, status_code = json.loads(done.stdout.splitlines()[-1])
    assert (directory, removed, status_code) == (private_dirs.fallback, 1, 0)
    assert reason == ("LUNA_SHM_DIR 'rel' is relative and the working directory it is "
                      "relative to is gone")


def test_a_first_call_at_the_fd_limit_raises_emfile_and_never_settles_on_the_wrong_dir(
        private_dirs) -> None:
    # A daemon whose first luna_shm call comes at its fd limit: /proc/self/mountinfo could
    # not be opened, so a RAM dir that is no mount point of its own (a subdirectory of a
    # tmpfs) was taken for a disk dir ("not a RAM disk (filesystem type 0x1021994)", the
    # tmpfs magic) and the fallback dir cached for the life of the process.
    code = textwrap.dedent("""
        import errno, json, os, resource
        import luna_shm
    """) + FILL_FD_TABLE + textwrap.dedent("""
        try:
            first = luna_shm.get_temp_audio_path()
        except OSError as exc:
            first = [errno.errorcode[exc.errno], exc.filename]
        for fd in held:
            os.close(fd)
        print(json.dumps([first, luna_shm.temp_dir(), luna_shm.is_using_ram_disk()]))
    """)
    env = {**os.environ, "LUNA_SHM_DIR": private_dirs.ram, "TMPDIR": private_dirs.fallback,
           "PYTHONPATH": LIBRARY_PATH}
    env.pop("LUNA_SHM_DISABLE", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    first, directory, in_ram = json.loads(done.stdout.splitlines()[-1])
    assert first == ["EMFILE", "/proc/self/mountinfo"]
    assert (directory, in_ram) == (private_dirs.ram, True)
    assert "not a RAM disk" not in done.stderr


def test_fallback_dir_honours_tmpdir(private_dirs, monkeypatch) -> None:
    monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
    other = Path(private_dirs.fallback) / "other"
    other.mkdir()
    monkeypatch.setenv("TMPDIR", str(other))
    path = get_temp_audio_path(create=True)
    assert os.path.dirname(path) == str(other)
    assert os.listdir(other) == [os.path.basename(path)]


@pytest.mark.parametrize("tmpdir", [None, "missing"], ids=["unset", "names-a-missing-dir"])
def test_fallback_dir_is_slash_tmp_without_a_usable_tmpdir(
    private_dirs, monkeypatch, tmpdir
) -> None:
    # Only names are asked for (create=False): the machine's /tmp is not written.
    monkeypatch.setenv("LUNA_SHM_DISABLE", "1")
    if tmpdir is None:
        monkeypatch.delenv("TMPDIR")
    else:
        monkeypatch.setenv("TMPDIR", f"{private_dirs.fallback}/{tmpdir}")
    assert luna_shm.temp_dir() == "/tmp"
    path = get_temp_audio_path(create=False)
    assert path.startswith("/tmp/luna_audio_")


def _fallback_dir_as_other_user(tmpdir: str) -> str:
    """In a forked child that became uid 65534: the fallback dir with TMPDIR=tmpdir."""
    os.environ.update(LUNA_SHM_DISABLE="1", TMPDIR=tmpdir)
    placement.refresh()
    return luna_shm.temp_dir()


def test_fallback_dir_passes_over_a_tmpdir_this_user_cannot_write_in(private_dirs) -> None:
    # As tempfile does; found in review: every file was refused with EACCES there.
    os.chmod(private_dirs.ram, 0o755)  # root's, which uid 65534 may enter but not write
    assert as_other_user(_fallback_dir_as_other_user, private_dirs.ram) == "/tmp"
    writable = f"{private_dirs.ram}/theirs"
    os.mkdir(writable, 0o700)
    os.chown(writable, 65534, 65534)
    assert as_other_user(_fallback_dir_as_other_user, writable) == writable


def test_a_tmp_that_is_a_symlink_is_resolved_and_every_file_made_there_is_cleaned_up() -> None:
    # Found in session 22: with /tmp a symlink (/tmp -> /private/tmp), files went to
    # /tmp/... and none could be removed (the cleanups open our dirs with O_NOFOLLOW):
    # cleanup_temp_audio raised ValueError ("/tmp is a symlink"), temp_audio_path raised
    # it on leaving a block that went well, cleanup_all_temp_audio and status saw 0 files.
    done = run_in_private_shm(
        child_tmp_as_symlink("/real_tmp") + child_report() + textwrap.dedent("""
            import numpy as np
            from luna_shm.cli import collect_status
            made = luna_shm.get_temp_audio_path(create=True)
            removed = luna_shm.cleanup_temp_audio(made)
            with luna_shm.temp_audio_path() as in_block:
                luna_shm.write_wav(in_block, np.zeros(8, np.int16), 8000)
            written = luna_shm.write_wav(None, np.zeros(8, np.int16), 8000)
            counted = sum(group["count"] for group in collect_status()["files"])
            report(made=made, removed=removed, in_block_left=os.path.lexists(in_block),
                   written=written, counted=counted,
                   cleaned=luna_shm.cleanup_all_temp_audio(),
                   left=sorted(n for n in os.listdir("/real_tmp") if "luna" in n))
        """),
        read_only=True,  # the RAM disk refused: files go to the fallback dir
    )
    out = json.loads(assert_child_ok(done))
    assert out["temp_dir"] == "/real_tmp"
    assert os.path.dirname(out["made"]) == os.path.dirname(out["written"]) == "/real_tmp"
    assert out["removed"] is True
    assert out["in_block_left"] is False
    assert (out["counted"], out["cleaned"], out["left"]) == (1, 1, [])


@pytest.mark.parametrize(("value", "disabled"), [
    ("1", True), ("true", True), ("YES", True), ("on", True), ("anything", True),
    ("", False), ("0", False), ("false", False), ("No", False), ("OFF", False),
    (" 0 ", False)])
def test_luna_shm_disable_takes_the_usual_spellings_of_true_and_false(
    private_dirs, monkeypatch, value: str, disabled: bool
) -> None:
    # Found in review: LUNA_SHM_DISABLE=false turned the RAM disk off.
    monkeypatch.setenv("LUNA_SHM_DISABLE", value)
    expected = private_dirs.fallback if disabled else private_dirs.ram
    assert luna_shm.temp_dir() == expected


def _plant_ram_dir(kind: str, ram: str, disk: Path) -> tuple[str, str]:
    """Make an unusable RAM dir candidate; return (its path, the reason expected in the log)."""
    path = f"{ram}/candidate"
    if kind == "missing":
        return path, f"{path} cannot be examined (No such file or directory)"
    if kind == "regular-file":
        Path(path).write_bytes(b"")
        return path, f"{path} is not a directory"
    if kind == "symlink":
        real = f"{ram}/real"
        os.mkdir(real, 0o700)  # usable itself: only the link is refused
        os.symlink(real, path)
        return path, f"{path} is a symbolic link"
    if kind == "world-writable-no-sticky":
        os.mkdir(path)
        os.chmod(path, 0o777)
        return path, f"{path} is world-writable without the sticky bit"
    if kind == "owned-by-another-user":
        if os.geteuid() != 0:
            pytest.skip("needs root to give a directory to uid 65534")
        os.mkdir(path, 0o755)
        os.chown(path, 65534, 65534)
        return path, f"{path} is owned by another user (uid 65534)"
    if kind == "disk-dir":
        require_disk_dir(disk)
        return str(disk), f"{disk} is not a RAM disk"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["missing", "regular-file", "symlink", "world-writable-no-sticky", "owned-by-another-user",
     "disk-dir"],
)
def test_unusable_ram_dir_falls_back_and_logs_why_once(
    private_dirs, monkeypatch, caplog, tmp_path, kind
) -> None:
    caplog.set_level(logging.DEBUG, logger="luna_shm")
    disk = tmp_path / "disk"
    disk.mkdir()
    candidate, reason = _plant_ram_dir(kind, private_dirs.ram, disk)
    before = sorted(os.listdir(candidate)) if os.path.isdir(candidate) else None
    monkeypatch.setenv("LUNA_SHM_DIR", candidate)

    paths = [get_temp_audio_path(create=True) for _ in range(3)]
    # Make luna_shm choose again (another cache key, same outcome): still one message.
    monkeypatch.setenv("LUNA_SHM_DISABLE", "0")
    paths.append(get_temp_audio_path(create=True))
    monkeypatch.delenv("LUNA_SHM_DISABLE")
    paths.append(get_temp_audio_path(create=True))

    assert {os.path.dirname(p) for p in paths} == {private_dirs.fallback}
    assert luna_shm.temp_dir() == private_dirs.fallback
    assert luna_shm.is_using_ram_disk() is (statfs_type(private_dirs.fallback) in RAM_FS_NAMES)
    records = luna_records(caplog, reason)
    assert len(records) == 1, caplog.text
    assert records[0].levelno == logging.WARNING
    assert f"falling back to {private_dirs.fallback}" in records[0].getMessage()
    if before is not None and not os.path.islink(candidate):
        assert sorted(os.listdir(candidate)) == before


def test_world_writable_ram_dir_with_sticky_bit_is_accepted(private_dirs, monkeypatch) -> None:
    sticky = f"{private_dirs.ram}/sticky"
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    monkeypatch.setenv("LUNA_SHM_DIR", sticky)
    assert os.path.dirname(get_temp_audio_path(create=True)) == sticky
    assert luna_shm.is_using_ram_disk() is True


def test_refresh_temp_dir_picks_up_a_ram_dir_that_appeared(private_dirs, monkeypatch) -> None:
    later = f"{private_dirs.ram}/later"
    monkeypatch.setenv("LUNA_SHM_DIR", later)
    assert os.path.dirname(get_temp_audio_path(create=True)) == private_dirs.fallback
    os.mkdir(later, 0o700)

    assert luna_shm.refresh_temp_dir() == later

    assert luna_shm.temp_dir() == later
    assert luna_shm.is_using_ram_disk() is True
    assert os.path.dirname(get_temp_audio_path(create=True)) == later


def test_refresh_temp_dir_notices_a_ram_dir_that_went_away(private_dirs, monkeypatch) -> None:
    gone = f"{private_dirs.ram}/gone"
    os.mkdir(gone, 0o700)
    monkeypatch.setenv("LUNA_SHM_DIR", gone)
    assert luna_shm.temp_dir() == gone
    os.rmdir(gone)

    assert luna_shm.refresh_temp_dir() == private_dirs.fallback

    assert os.path.dirname(get_temp_audio_path(create=True)) == private_dirs.fallback


def test_a_file_whose_size_is_known_says_why_when_the_ram_dir_went_away_unrefreshed(
        private_dirs, monkeypatch, caplog) -> None:
    # Found in review: a RAM dir removed after the placement was chosen sent sized files
    # to the fallback dir (right) saying they "do not fit ... (0 bytes free)" (wrong).
    gone = f"{private_dirs.ram}/gone"
    os.mkdir(gone, 0o700)
    monkeypatch.setenv("LUNA_SHM_DIR", gone)
    assert luna_shm.temp_dir() == gone
    os.rmdir(gone)
    caplog.set_level(logging.INFO, logger="luna_shm")

    path = get_temp_audio_path(size_hint=1000)

    assert os.path.dirname(path) == private_dirs.fallback
    assert [r.getMessage() for r in luna_records(caplog, gone)] == [
        f"luna_shm: {gone} cannot be examined (No such file or directory): using "
        f"{private_dirs.fallback} for a file of 1000 bytes"]


# ---- the RAM disk refusing files: real read-only and full mounts -----------------------------


@pytest.mark.parametrize("fallback_fs", ["disk", "tmpfs"])
def test_read_only_ram_disk_falls_back_to_tmp(tmp_path, fallback_fs) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if fallback_fs == "disk":
        require_disk_dir(disk)
        preamble = disk_tmp_preamble(disk)
    else:
        preamble = ""  # the child's /tmp stays a private tmpfs
    done = run_in_private_shm(
        preamble + child_report() + textwrap.dedent("""
            path = luna_shm.get_temp_audio_path(create=True)
            st = os.lstat(path)
            report(path=path, mode=st.st_mode, tmp=""" + LIST_PRIVATE_TMP + """)
        """),
        read_only=True,
    )
    out = json.loads(assert_child_ok(done))
    assert out["temp_dir"] == "/tmp"
    assert out["path"].startswith("/tmp/luna_audio_")
    assert stat.S_ISREG(out["mode"]) and stat.S_IMODE(out["mode"]) == 0o600
    assert out["shm"] == []
    assert out["tmp"] == [os.path.basename(out["path"])]
    assert out["in_ram"] is (fallback_fs == "tmpfs")
    warnings = [m for level, m in out["log"] if level == "WARNING"]
    assert warnings == ["luna_shm: falling back to /tmp: /dev/shm is not writable "
                        "(Read-only file system)"]
    if fallback_fs == "disk":
        assert disk_listing(disk) == [os.path.basename(out["path"])]


@pytest.mark.parametrize(
    ("refusal", "strerror", "after_refresh"),
    [
        # Read-only: a fresh probe sees it and keeps using /tmp.
        ("mount -o remount,ro /dev/shm", "Read-only file system", "/tmp"),
        # Out of inodes: still a writable RAM disk to a probe; only creation fails.
        ("mount -o remount,nr_inodes=8 /dev/shm", "No space left on device", "/dev/shm"),
    ],
    ids=["remounted-read-only", "out-of-inodes"],
)
def test_ram_disk_that_starts_refusing_files_sends_them_to_tmp(
    tmp_path, refusal, strerror, after_refresh
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    require_disk_dir(disk)
    done = run_in_private_shm(
        disk_tmp_preamble(disk) + child_report() + textwrap.dedent(f"""
            import errno, subprocess
            first = luna_shm.get_temp_audio_path(create=True)
            subprocess.run({refusal.split()!r}, check=True)
            if "nr_inodes" in {refusal!r}:
                # Use up every inode left, outside luna_shm.
                for i in range(100):
                    try:
                        os.close(os.open(f"/dev/shm/filler{{i}}", os.O_CREAT | os.O_WRONLY))
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
                else:
                    raise AssertionError("the inode limit did not apply")
            second = luna_shm.get_temp_audio_path(create=True)
            third = luna_shm.get_temp_audio_path(create=True)
            refreshed = luna_shm.refresh_temp_dir()
            report(first=first, second=second, third=third, refreshed=refreshed,
                   second_is_file=os.path.isfile(second))
        """)
    )
    out = json.loads(assert_child_ok(done))
    assert out["first"].startswith("/dev/shm/luna_audio_")
    for key in ("second", "third"):
        assert out[key].startswith("/tmp/luna_audio_")
    assert out["second_is_file"]
    assert disk_listing(disk) == sorted(
        os.path.basename(out[k]) for k in ("second", "third"))
    messages = [m for _, m in out["log"]]
    expected = f"luna_shm: /dev/shm refused a new file ({strerror}): using /tmp for such files"
    assert messages.count(expected) == 1, messages
    assert out["refreshed"] == out["temp_dir"] == after_refresh
    assert out["in_ram"] is (after_refresh == "/dev/shm")


def test_file_larger_than_the_free_ram_goes_to_the_fallback_dir(tmp_path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    require_disk_dir(disk)
    done = run_in_private_shm(
        disk_tmp_preamble(disk) + child_report() + textwrap.dedent("""
            big = luna_shm.get_temp_audio_path(size_hint=1 << 20, create=True)
            small = luna_shm.get_temp_audio_path(size_hint=1024, create=True)
            default = luna_shm.get_temp_audio_path(create=True)
            report(big=big, small=small, default=default)
        """),
        shm_size="64k",
    )
    out = json.loads(assert_child_ok(done))
    assert out["big"].startswith("/tmp/luna_audio_")
    assert out["small"].startswith("/dev/shm/luna_audio_")
    assert out["default"].startswith("/dev/shm/luna_audio_")
    assert out["temp_dir"] == "/dev/shm" and out["in_ram"] is True
    assert disk_listing(disk) == [os.path.basename(out["big"])]
    assert any(f"a file of {1 << 20} bytes does not fit in /dev/shm" in m for _, m in out["log"])


def test_a_file_whose_size_is_known_goes_to_the_fallback_dir_when_the_ram_disk_has_no_inode_left(
) -> None:
    # Found in session 22: only the bytes free were compared, so with every inode taken
    # (nr_inodes) get_temp_audio_path(size_hint=...) named a file in /dev/shm that no
    # writer could make (ENOSPC), although the README sends a file the RAM disk has no
    # room for to the fallback dir.
    done = run_in_private_shm(
        child_take_every_inode(8) + child_report() + textwrap.dedent("""
            full = luna_shm.get_temp_audio_path(size_hint=1024)
            with open(full, "wb") as engine:  # what a TTS engine does with the name
                engine.write(b"RIFF")
            os.unlink("/dev/shm/filler0")
            room = luna_shm.get_temp_audio_path(size_hint=1024)
            report(full=full, room=room)
        """),
    )
    out = json.loads(assert_child_ok(done))
    assert out["full"].startswith("/tmp/luna_audio_")
    assert out["room"].startswith("/dev/shm/luna_audio_")
    assert out["temp_dir"] == "/dev/shm"
    assert any("a file of 1024 bytes does not fit in /dev/shm (no inode free of 8)" in m
               for _, m in out["log"])


def test_every_producer_of_a_new_temp_file_works_without_proc_mounted() -> None:
    # Found in session 22: a new temp file is made unnamed (O_TMPFILE) and named through
    # /proc/self/fd/N; in a sandbox with no /proc (a chroot or bubblewrap without one)
    # every such producer failed with FileNotFoundError naming a file in /tmp, after a
    # warning that "/dev/shm refused a new file (No such file or directory)".
    done = run_in_private_shm(
        textwrap.dedent("""
            import subprocess
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "noproc", "/proc"],
                           check=True)
        """) + child_report() + textwrap.dedent("""
            import numpy as np
            audio = np.arange(100, dtype=np.int16)
            made = [luna_shm.write_wav(None, audio, 8000),
                    luna_shm.write_wav(None, audio, 8000, atomic=True),
                    luna_shm.save_temp_audio(b"ID3 encoded"),
                    luna_shm.save_temp_audio(iter([b"a", b"b"]))]
            with luna_shm.WavWriter(None, 8000) as writer:
                writer.write(audio)
            made.append(writer.path)
            with luna_shm.create_wav_buffer(100, 8000) as buffer:
                buffer.array[:] = audio
            made.append(buffer.path)
            same = [bool(np.array_equal(luna_shm.read_wav(path, mmap=False)[0], audio))
                    for path in made if path.endswith(".wav")]
            report(proc=os.listdir("/proc"), dirs=sorted({os.path.dirname(p) for p in made}),
                   same=same, tmp=""" + LIST_PRIVATE_TMP + """)
        """),
    )
    out = json.loads(assert_child_ok(done))
    assert out["proc"] == []
    assert out["dirs"] == ["/dev/shm"]
    assert out["same"] == [True] * 4
    assert len(out["shm"]) == 6 and out["tmp"] == []
    assert [m for level, m in out["log"] if level == "WARNING"] == []


@pytest.mark.parametrize("mount_options", [["-t", "ramfs"], ["-t", "tmpfs", "-o", "size=0"]],
                         ids=["ramfs", "tmpfs-without-a-size-limit"])
def test_a_ram_disk_with_no_size_limit_keeps_every_file_whose_size_is_known(
        mount_options: list[str]) -> None:
    # Found in review: ramfs (and a tmpfs mounted with size=0) reports 0 blocks and 0
    # free to statvfs, as it has no limit; every producer that knows its size took that
    # for "0 bytes free" and went to the fallback dir with a "does not fit" warning.
    done = run_in_private_shm(
        textwrap.dedent(f"""
            import os, subprocess, time
            import numpy as np
            os.mkdir("/tmp/unlimited")
            subprocess.run(["mount", *{mount_options!r}, "unlimited", "/tmp/unlimited"],
                           check=True)
            os.chmod("/tmp/unlimited", 0o700)
            os.environ["LUNA_SHM_DIR"] = "/tmp/unlimited"
            statvfs = os.statvfs("/tmp/unlimited")
        """) + child_report() + textwrap.dedent("""
            audio = np.zeros(50_000, np.int16)
            with luna_shm.create_wav_buffer(1000, 16000) as buf, \\
                    luna_shm.AudioPool(slots=1, max_bytes=200_000) as pool, \\
                    pool.write_wav(audio, 16000) as pooled:
                paths = [luna_shm.get_temp_audio_path(size_hint=1 << 20),
                         luna_shm.get_temp_audio_path(size_hint=1 << 20, create=True),
                         luna_shm.write_wav(None, audio, 16000),
                         luna_shm.write_wav(None, audio, 16000, atomic=True),
                         luna_shm.save_temp_audio(audio.tobytes()),
                         buf.path, pooled.path]
            # The prefault reserve prepares files there too (it asks for twice their size).
            luna_shm.prefault_wav_buffers(1 << 20)
            luna_shm.create_wav_buffer(1000, 16000).close()
            deadline = time.monotonic() + 60
            while luna_shm.prefault_stats().files == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = luna_shm.prefault_stats()
            luna_shm.prefault_wav_buffers(0)
            import contextlib, io, luna_shm.cli
            status = io.StringIO()
            with contextlib.redirect_stdout(status):
                luna_shm.cli.main(["status"])
            space = [line for line in status.getvalue().splitlines() if "space:" in line]
            as_json = luna_shm.cli.collect_status()
            report(paths=paths, blocks=statvfs.f_blocks, prepared=stats.files,
                   failures=stats.failures, space=space,
                   json_space=[as_json[k] for k in ("bytes_total", "size_limited")])
        """)
    )
    out = json.loads(assert_child_ok(done))
    assert out["blocks"] == 0 and out["temp_dir"] == "/tmp/unlimited" and out["in_ram"]
    assert [os.path.dirname(path) for path in out["paths"]] == ["/tmp/unlimited"] * 7
    assert out["prepared"] >= 1 and out["failures"] == 0
    assert out["space"] == ["space:    no size limit (its filesystem reports none)"]
    assert out["json_space"] == [0, False]
    assert out["log"] == []


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_a_tmpdir_on_a_read_only_tmpfs_is_passed_over(read_only) -> None:
    # LUNA_SHM_DISABLE=1 and TMPDIR on a tmpfs: used when writable; read-only, it is
    # passed over for /tmp (the child's private tmpfs), as tempfile does. (Before, it
    # was used, and is_using_ram_disk() said True of a dir no file could be made in.)
    done = run_in_private_shm(
        """
        import luna_shm
        print(luna_shm.is_using_ram_disk(), luna_shm.temp_dir())
        """,
        read_only=read_only, env={"LUNA_SHM_DISABLE": "1", "TMPDIR": "/dev/shm"},
    )
    assert assert_child_ok(done).split() == ["True", "/tmp" if read_only else "/dev/shm"]


def test_a_probe_while_another_thread_changes_the_environment_caches_what_it_probed(
        private_dirs, monkeypatch) -> None:
    # current() read the environment for its cache key, then _choose read it again for
    # the probe: a thread that set LUNA_SHM_DIR between the two had the placement of
    # the new value cached under the old one, and every later call with the old value
    # (this thread's own, set back) got the other directory. The key is now what was
    # probed.
    first = private_dirs.ram
    second = os.path.join(first, "second")
    os.mkdir(second, 0o700)
    before = sys.getswitchinterval()

    def rounds() -> list[str]:
        wrong: list[str] = []
        for _ in range(1000):
            os.environ["LUNA_SHM_DIR"] = first
            placement.refresh()
            barrier = threading.Barrier(2)

            def change(barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                os.environ["LUNA_SHM_DIR"] = second

            def probe(barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                placement.refresh()

            threads = [threading.Thread(target=change), threading.Thread(target=probe)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            os.environ["LUNA_SHM_DIR"] = first  # no refresh: what the cache holds
            if placement.current().ram_dir != first:
                wrong.append(placement.current().ram_dir)
        return wrong

    monkeypatch.setenv("LUNA_SHM_DIR", first)  # restored afterwards
    sys.setswitchinterval(1e-5)  # a thread switch between any two bytecodes, often
    try:
        wrong = call_with_deadline(rounds)
    finally:
        sys.setswitchinterval(before)
    assert wrong == []


def test_a_probe_that_ends_after_a_refresh_leaves_the_refreshed_choice_cached(
        private_dirs, monkeypatch) -> None:
    # A thread whose first call probed the directories (the RAM dir still there), then was
    # overtaken by a refresh_temp_dir() that saw the RAM dir gone, stored its older choice
    # over the refreshed one: every later call went to the removed directory until the
    # next refresh. A probe begun before a refresh no longer replaces its result.
    gone = f"{private_dirs.ram}/gone"
    os.mkdir(gone, 0o700)
    monkeypatch.setenv("LUNA_SHM_DIR", gone)
    placement.refresh()
    placement._cache.clear()  # the next current() probes (as a first call does)
    probed, go_on = threading.Event(), threading.Event()

    def hold_the_probed_choice(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "return" and frame.f_code is placement._choose.__code__:
            probed.set()
            go_on.wait(30)

    def first_call() -> None:
        sys.setprofile(hold_the_probed_choice)
        try:
            placement.current()
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=first_call)
    thread.start()
    try:
        assert probed.wait(30)
        os.rmdir(gone)
        assert luna_shm.refresh_temp_dir() == private_dirs.fallback
    finally:
        go_on.set()
        thread.join()
    assert luna_shm.temp_dir() == private_dirs.fallback
