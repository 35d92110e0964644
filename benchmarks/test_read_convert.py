"""Convert-on-read (PCM_16/PCM_24 as float32, 500 KB) and reads into a caller's array (50 MB),
beside soundfile, our plain read and the C floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in bench.cases_of_kind("read-convert",
                                                                      "read-out")])
def test_read_convert(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
