"""Write + read back of 500 KB, with and without cleanup, including the AudioPool path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import cases as bench


@pytest.mark.parametrize("name", [c.name for c in
                                  bench.cases_of_kind("roundtrip", "roundtrip+cleanup")])
def test_roundtrip(run_case: Callable[..., Any], name: str) -> None:
    run_case(name)
