"""Writes of 500 KB (int16 and float32) and float32 -> PCM_16 convert-on-write, side by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("write", "convert")])
def test_write(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
