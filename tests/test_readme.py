"""The README's quick start runs as written."""

import doctest
import os
import re

from helpers import REPO


def test_readme_quick_start_runs_as_a_doctest_and_leaves_no_file(private_dirs) -> None:
    result = doctest.testfile(str(REPO / "README.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10, "the README lost its quick start examples"
    assert result.failed == 0
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


def test_every_test_docs_reliability_names_exists() -> None:
    # docs/reliability.md says each row's test passes today: a renamed or removed test
    # would leave a row that no test backs.
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_[a-z0-9_]+\.py)(?:::([A-Za-z0-9_]+))?", doc))
    assert len(named) > 100, "docs/reliability.md lost its test references"
    missing = []
    for file_name, function in sorted(named):
        path = REPO / "tests" / file_name
        source = path.read_text(encoding="utf-8") if path.exists() else ""
        if not source or (function and not re.search(rf"^(?:async )?def {function}\(",
                                                       source, re.MULTILINE)):
            missing.append(f"{file_name}::{function}" if function else file_name)
    assert missing == []
