"""Checkpoints at remote URLs, read by byte range (ckptbridge._remote), and the one TensorFlow of ``[tf]``.

The servers are real and local (tests/servers.py): an HTTP server that honours
Range requests, counts the bytes it sends and injects faults, and moto's
standalone S3 server for s3fs.  The TensorFlow-free part reads through the HTTP
server with checkpoints written by the native writer; the ``tf`` part compares
with TensorFlow reading the same files locally.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- one TensorFlow for [tf]

#: The distributions that each install the ``tensorflow`` package: two of them in one venv write over each other.
TF_DISTRIBUTIONS = frozenset({
    "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel", "tensorflow-macos", "tensorflow-aarch64",
    "tensorflow-cpu-aws", "tensorflow-rocm", "intel-tensorflow", "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu",
    "tf-nightly-intel", "tf-nightly-macos",
})
#: What tf-keras 2.21 requires (its metadata: ``tensorflow<2.22,>=2.21``); the extra must give exactly this one.
TF_KERAS_REQUIRES = "tensorflow"


def _norm(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, requirement
    return _norm(m.group(1))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_tf_extra_gives_the_one_tensorflow_tf_keras_requires() -> None:
    extra = _pyproject()["project"]["optional-dependencies"]["tf"]
    names = [_req_name(r) for r in extra]
    assert "tf-keras" in names
    assert [n for n in names if n in TF_DISTRIBUTIONS] == [TF_KERAS_REQUIRES], extra
    # scripts/_env.sh installs the extra with requirements/tf.txt as constraints: they must pin the same one.
    with open(os.path.join(ROOT, "requirements", "tf.txt")) as f:
        pinned = [_req_name(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert [n for n in pinned if n in TF_DISTRIBUTIONS] == [TF_KERAS_REQUIRES], pinned
    try:
        requires = importlib.metadata.requires("tf-keras") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tf-keras is not installed here: the recorded requirement was checked, not its metadata")
    wanted = {_req_name(r) for r in requires if ";" not in r or "extra" not in r.split(";", 1)[1]}
    assert wanted & TF_DISTRIBUTIONS == {TF_KERAS_REQUIRES}, requires


@pytest.mark.tf
def test_tf_venv_has_exactly_one_tensorflow_distribution() -> None:
    found = sorted({_norm(d.metadata["Name"]) for d in importlib.metadata.distributions()} & TF_DISTRIBUTIONS)
    assert len(found) == 1, f"TensorFlow distributions installed: {found}"
    files = importlib.metadata.distribution(found[0]).files or []
    assert any(str(p) == "tensorflow/__init__.py" for p in files), f"{found[0]} does not provide the tensorflow package"


def test_remote_extra_names_fsspec_and_aiohttp() -> None:
    extra = _pyproject()["project"]["optional-dependencies"]["remote"]
    assert sorted(_req_name(r) for r in extra) == ["aiohttp", "fsspec"]
