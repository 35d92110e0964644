"""The README's quick start runs as written."""

import doctest
import os

from helpers import REPO


def test_readme_quick_start_runs_as_a_doctest_and_leaves_no_file(private_dirs) -> None:
    result = doctest.testfile(str(REPO / "README.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10, "the README lost its quick start examples"
    assert result.failed == 0
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []
