"""Every script in examples/ runs from the checkout as `python examples/X.py` and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_there_are_examples_to_run() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"tts_to_player.py", "cloud_tts_mp3.py", "daemon_handoff.py",
            "streaming_writer.py", "live_tts_to_player.py", "tts_cache.py"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs_and_leaves_the_private_dirs_empty(private_dirs, example: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LUNA_SHM_DISABLE"}
    env.update(LUNA_SHM_DIR=private_dirs.ram, TMPDIR=private_dirs.fallback)
    done = subprocess.run(
        [sys.executable, "-W", "always::ResourceWarning", str(example.relative_to(REPO))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr and "ResourceWarning" not in done.stderr, done.stderr
    assert done.stdout.strip(), "the example printed nothing"
    assert os.listdir(private_dirs.ram) == []
    assert os.listdir(private_dirs.fallback) == []
