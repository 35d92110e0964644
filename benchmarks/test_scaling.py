"""Write and read time against size: 10 KB, 100 KB, 500 KB, 5 MB, 50 MB (int16)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in
                                  bench.cases_of_kind("scale-write", "scale-read")])
def test_scaling(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
