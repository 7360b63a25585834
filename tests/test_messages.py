"""The library speaks in its own terms; the command line adds its flags.

An error raised through the Python API names the keyword that gets past it
(``pass force=True``); the same failure on the command line names the flag
(``pass --force``).  Before, library errors told Python callers about flags.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import CkptBridgeError, OutputExistsError, UnsafeArchiveError
from ckptbridge.errors import option, render

from helpers import assert_one_line_error, cli

PKG = os.path.dirname(ckptbridge.__file__)


@pytest.fixture()
def npz(tmp_path: Any) -> str:
    path = str(tmp_path / "a.npz")
    ckptbridge.save({"net/w": np.arange(300, dtype=np.float32)}, path)
    return path


def test_output_exists_names_the_keyword_then_the_flag(npz: str, tmp_path: Any) -> None:
    out = str(tmp_path / "b.npz")
    ckptbridge.save({"x": np.zeros(2)}, out)
    with pytest.raises(OutputExistsError) as e:
        ckptbridge.export(npz, out)
    assert "pass force=True to overwrite it" in str(e.value) and "--" not in str(e.value)
    assert_one_line_error(cli("export", npz, out), "already exists; pass --force to overwrite it")


def test_size_limits_name_bytes_in_the_api_and_gb_on_the_command_line(npz: str) -> None:
    with pytest.raises(UnsafeArchiveError) as e:
        ckptbridge.read(npz, max_tensor_bytes=16)
    assert "raise max_tensor_bytes if it is genuine" in str(e.value)
    assert_one_line_error(cli("ls", npz, "--max-tensor-gb", "1e-8"), "raise --max-tensor-gb if it is genuine")


def test_options_of_another_path_name_keywords_then_flags(npz: str, tmp_path: Any) -> None:
    out = str(tmp_path / "out" / "m.ckpt")
    with pytest.raises(CkptBridgeError) as e:
        ckptbridge.rebuild(npz, out, ckptbridge.Naming(layout=ckptbridge.Layout()))
    assert str(e.value) == "a Layout applies to an export; an import undoes the layout an archive records by itself: leave it out"
    assert_one_line_error(cli("import", npz, out, "--chunk-mb", "1"), "--chunk-mb applies to a rebuild through a graph; add --model")
    assert not os.path.exists(os.path.dirname(out))


def test_rename_rules_and_filters(npz: str, tmp_path: Any) -> None:
    with pytest.raises(CkptBridgeError) as e:
        ckptbridge.export(npz, str(tmp_path / "o.npz"), ckptbridge.Naming(rename=ckptbridge.Rename(rules=[("", "oops")])))
    assert str(e.value).startswith("rename rule '=oops' has an empty regex")
    assert_one_line_error(cli("export", npz, str(tmp_path / "o.npz"), "--rename", "oops"), "--rename rule 'oops' has no '='")
    with pytest.raises(CkptBridgeError, match=r"filtered out; check include/exclude$"):
        ckptbridge.export(npz, str(tmp_path / "o.npz"), ckptbridge.Naming(select=ckptbridge.Select(include=["^nothing$"])))
    assert_one_line_error(cli("export", npz, str(tmp_path / "o.npz"), "--include", "^nothing$"), "check --include/--exclude")
    assert os.listdir(tmp_path) == ["a.npz"]


def test_marks_are_spelled_by_whoever_shows_them() -> None:
    msg = f"pass {option('force', True)}, {option('engine', 'tf')} or {option('max_tensor_bytes')}"
    assert render(msg) == "pass force=True, engine='tf' or max_tensor_bytes"
    from ckptbridge.cli import _flag

    assert render(msg, _flag) == "pass --force, --engine tf or --max-tensor-gb"
    # A name that happens to hold the mark's characters is shown by repr(), which escapes them.
    assert render(f"tensor {chr(0xE000) + 'force' + chr(0xE001)!r}") == "tensor '\\ue000force\\ue001'"


def _raised_strings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            out += [(c.lineno, c.value) for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return out


def test_no_library_error_names_a_command_line_flag() -> None:
    """Only cli.py may spell flags; everything else marks the option with errors.option."""
    found = []
    for root, _, files in os.walk(PKG):
        for f in files:
            path = os.path.join(root, f)
            if not f.endswith(".py") or path == os.path.join(PKG, "cli.py"):
                continue
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            found += [f"{os.path.relpath(path, PKG)}:{line}: {s!r}" for line, s in _raised_strings(tree) if re.search(r"(^|[\s(])--[a-z]", s)]
    assert not found, "\n".join(found)
