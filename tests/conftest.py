"""Fixtures: every test that creates or deletes files does so in private directories."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luna_shm import placement


@dataclass
class PrivateDirs:
    """A private RAM dir (a fresh directory inside the /dev/shm tmpfs) and fallback dir."""

    ram: str
    fallback: str


@pytest.fixture
def ram(private_dirs: PrivateDirs) -> Path:
    """The private RAM dir as a Path."""
    return Path(private_dirs.ram)


@pytest.fixture
def private_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[PrivateDirs]:
    """Point luna_shm at private dirs: LUNA_SHM_DIR in /dev/shm, TMPDIR on disk."""
    ram = tempfile.mkdtemp(prefix="luna_shm_test_", dir="/dev/shm")
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    monkeypatch.setenv("LUNA_SHM_DIR", ram)
    monkeypatch.setenv("TMPDIR", str(fallback))
    monkeypatch.delenv("LUNA_SHM_DISABLE", raising=False)
    placement.refresh()
    try:
        yield PrivateDirs(ram=ram, fallback=str(fallback))
    finally:
        shutil.rmtree(ram, ignore_errors=True)
        monkeypatch.undo()
        placement.refresh()


def _our_files_in_shared_dirs() -> set[str]:
    found = set()
    for directory in ("/dev/shm", "/tmp"):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found.update(f"{directory}/{n}" for n in names
                     if n.startswith(("luna_audio_", "luna_daemon_", ".luna_audio_")))
    return found


@pytest.fixture(scope="session", autouse=True)
def _shared_dirs_stay_untouched() -> Iterator[None]:
    """Fail the run if a test left one of our files in the machine's shared dirs."""
    before = _our_files_in_shared_dirs()
    yield
    left = _our_files_in_shared_dirs() - before
    assert not left, f"tests left files in the shared /dev/shm or /tmp: {sorted(left)}"


@pytest.fixture(scope="session", autouse=True)
def _audio_clients_keep_their_runtime_dir_private(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Give every child process a private XDG_RUNTIME_DIR (mode 0700).

    espeak-ng initialises PulseAudio even when it only writes a file (-w). With no
    XDG_RUNTIME_DIR, libpulse makes its runtime dir as $TMPDIR/pulse-<random> and points
    ~/.config/pulse/<machine-id>-runtime at it; a later client reuses that link until its
    target is gone. A test that sets TMPDIR to a private fallback dir would then find a
    pulse-* directory there, or not, depending on what ran before: with this, never.
    """
    runtime = tmp_path_factory.mktemp("xdg_runtime")
    runtime.chmod(0o700)
    saved = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = saved
