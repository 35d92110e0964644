"""The C API is declared once, in csrc/luna_shm.h: the cffi binding is built from it, and the
type stub src/luna_shm/_native.pyi must say the same (a drift fails here). What the C files
share only with each other is declared in csrc/luna_internal.h, and Python never gets it."""

from __future__ import annotations

import ast
import re
import sys
from typing import Any

import pytest

from helpers import REPO
from luna_shm._native import ffi, lib

sys.path.insert(0, str(REPO / "csrc"))
import build  # csrc/build.py, the cffi build script: found through sys.path

HEADER = REPO / "csrc" / "luna_shm.h"
INTERNAL_HEADER = REPO / "csrc" / "luna_internal.h"
STUB = REPO / "src" / "luna_shm" / "_native.pyi"
PROTOTYPE = re.compile(r"^(?:int|void)\s+\**(luna_\w+)\(", re.MULTILINE)


def stub_lib() -> tuple[dict[str, ast.FunctionDef], set[str]]:
    """The stub's _Lib class: its methods by name, and its constants."""
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    lib_class = next(node for node in tree.body
                     if isinstance(node, ast.ClassDef) and node.name == "_Lib")
    methods = {node.name: node for node in lib_class.body if isinstance(node, ast.FunctionDef)}
    constants = {node.target.id for node in lib_class.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    return methods, constants


def compiled_functions() -> dict[str, Any]:
    return {name: ffi.typeof(getattr(lib, name)) for name in dir(lib)
            if name.startswith("luna_")}


def test_every_prototype_of_the_header_is_inside_the_part_cffi_reads() -> None:
    in_header = set(PROTOTYPE.findall(HEADER.read_text(encoding="utf-8")))
    in_cdef = set(PROTOTYPE.findall(build.read_cdef()))
    assert in_header, "no prototypes found: the pattern is wrong"
    assert in_header == in_cdef


def test_what_the_c_files_share_among_themselves_is_declared_once_and_not_given_to_python(
        ) -> None:
    internal = PROTOTYPE.findall(INTERNAL_HEADER.read_text(encoding="utf-8"))
    assert internal, "no prototypes found: the pattern is wrong"
    assert len(set(internal)) == len(internal)
    assert not set(internal) & set(PROTOTYPE.findall(HEADER.read_text(encoding="utf-8")))
    assert not set(internal) & set(compiled_functions())
    assert all(not hasattr(lib, name) for name in internal)


def test_the_compiled_module_has_exactly_the_functions_the_header_declares() -> None:
    assert set(compiled_functions()) == set(PROTOTYPE.findall(build.read_cdef()))


def test_the_stub_declares_exactly_the_compiled_functions_and_constants() -> None:
    methods, constants = stub_lib()
    assert set(methods) == set(compiled_functions())
    compiled_constants = {name for name in dir(lib) if name.startswith("LUNA_")}
    assert constants == compiled_constants


@pytest.mark.parametrize("name", sorted(compiled_functions()))
def test_the_stub_gives_each_function_its_arity_and_result(name: str) -> None:
    method = stub_lib()[0][name]
    ctype = compiled_functions()[name]
    params = [arg.arg for arg in method.args.args][1:]  # without self
    assert len(params) == len(ctype.args), (name, params, ctype)
    returns = ast.unparse(method.returns) if method.returns else None
    expected = ("None" if ctype.result.cname == "void"
                else "Any" if ctype.result.kind == "pointer" else "int")
    assert returns == expected, (name, returns, ctype)

