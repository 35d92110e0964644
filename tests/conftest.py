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
