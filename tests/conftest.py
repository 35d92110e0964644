"""Fixtures: every test that creates or deletes files does so in private directories."""

from __future__ import annotations

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
