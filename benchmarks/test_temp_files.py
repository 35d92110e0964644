"""get_temp_audio_path() with the file created, and cleanup_all_temp_audio() on 10,000 files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("temp-path", "cleanup")])
def test_temp_files(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
