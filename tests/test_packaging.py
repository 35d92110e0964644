"""What a user meets when installing: without a C compiler, pip stops with one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

NOT_SOURCES = shutil.ignore_patterns(".venv*", "build", "dist", ".git", "*.so", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".hypothesis",
                                     ".mypy_cache", ".ruff_cache", "bench-report")


def test_pip_install_without_a_c_compiler_says_a_compiler_is_needed(tmp_path: Path) -> None:
    source = tmp_path / "luna_shm"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "PIP_NO_INPUT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(tmp_path / "wheels"), str(source)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "luna_shm: building the C layer needs a working C compiler (gcc or clang" in (
        done.stdout + done.stderr)
    assert not (tmp_path / "wheels").exists() or not list((tmp_path / "wheels").iterdir())
