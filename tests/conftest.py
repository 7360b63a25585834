"""Shared fixtures: real checkpoints written by TensorFlow, built once per session and only on demand.

TensorFlow is the oracle: tests export these checkpoints and compare what
ckptbridge reads back with ``tf.train.load_checkpoint``.  Nothing here imports
TensorFlow until a fixture that needs it is requested, so a venv without
TensorFlow still runs every other test.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture()
def secret(tmp_path: Any) -> str:
    """A file a crafted archive must not be able to read: 4 KiB of a recognisable token (helpers.SECRET)."""
    from helpers import SECRET

    p = tmp_path / "secret.bin"
    p.write_bytes((SECRET * 200)[:4096])
    return str(p)


@pytest.fixture()
def good_npz(tmp_path: Any) -> str:
    """A plain, valid .npz with one float32 tensor "w", beside a crafted archive to diff against."""
    p = str(tmp_path / "good.npz")
    np.savez(p, w=np.arange(6, dtype=np.float32))
    return p


@pytest.fixture(scope="session")
def ckpts() -> ModuleType:
    """The checkpoint builders (tests/tf_checkpoints.py); skips without TensorFlow, tf-slim or tf-keras."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_slim")
    pytest.importorskip("tf_keras")
    import tf_checkpoints

    return tf_checkpoints


@pytest.fixture(scope="session")
def assert_same_as_tf(ckpts: ModuleType) -> Callable[..., int]:
    """``assert_same_as_tf(reader_or_mapping, prefix)``: bit-exact against TensorFlow's reader."""
    return ckpts.assert_same_as_tf


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``module_tmp(name)``: ``tmp_path_factory.mktemp`` for a module's fixtures, removed when the module is done.

    The TensorFlow part writes several GB (VGG-sized nets and their exports), and CI shares its
    disk; pytest itself would keep these directories until the session ends.
    """
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _build(factory: Any, name: str, builder: Callable[[str], Any]) -> Any:
    return builder(str(factory.mktemp(name)))


@pytest.fixture(scope="session")
def vgg16_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """tf-slim vgg_16, num_classes=10, weights only, V2 (about 510 MB: fc6 alone is 411 MB)."""
    return _build(tmp_path_factory, "vgg16", ckpts.build_vgg16_plain)


@pytest.fixture(scope="session")
def resnet_ckpts(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """resnet_v1_50 after a Momentum step with EMA: {"v2", "v1", "v2_dir", "v1_dir"}."""
    return _build(tmp_path_factory, "resnet", lambda d: ckpts.build_trained(d, "resnet_v1_50", 64))


@pytest.fixture(scope="session")
def inception_ckpts(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """inception_v3 after a Momentum step with EMA: {"v2", "v1", "v2_dir", "v1_dir"}."""
    return _build(tmp_path_factory, "inception", lambda d: ckpts.build_trained(d, "inception_v3", 139))


@pytest.fixture(scope="session")
def resnet_v2(resnet_ckpts: dict[str, str]) -> str:
    return resnet_ckpts["v2"]


@pytest.fixture(scope="session")
def resnet_v1(resnet_ckpts: dict[str, str]) -> str:
    return resnet_ckpts["v1"]


@pytest.fixture(scope="session")
def inception_v2(inception_ckpts: dict[str, str]) -> str:
    return inception_ckpts["v2"]


@pytest.fixture(scope="session")
def inception_v1(inception_ckpts: dict[str, str]) -> str:
    return inception_ckpts["v1"]


@pytest.fixture(scope="session")
def sharded_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Saver(sharded=True) over variables on three CPU devices: .data-0000{0,1,2}-of-00003."""
    return _build(tmp_path_factory, "sharded", ckpts.build_sharded)


@pytest.fixture(scope="session")
def partitioned_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fixed_size_partitioner(3) variable "embedding" [11, 5] saved as slices."""
    return _build(tmp_path_factory, "partitioned", ckpts.build_partitioned)


@pytest.fixture(scope="session")
def dtypes_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every dtype, 0-d scalars, zero-size tensors, "w" beside "w/ExponentialMovingAverage"."""
    return _build(tmp_path_factory, "dtypes", ckpts.build_dtypes)


@pytest.fixture(scope="session")
def tf2_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TF2 tf.train.Checkpoint of a tf.Module and a tf-keras Adam with slots."""
    return _build(tmp_path_factory, "tf2", ckpts.build_tf2)


@pytest.fixture(scope="session")
def lowbit_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """float8, float4, int4/int2 and quantized tensors, written by SaveV2 (tests/tf_checkpoints.py)."""
    return _build(tmp_path_factory, "lowbit", ckpts.build_lowbit)


@pytest.fixture(scope="session")
def many_ckpt(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> str:
    """3,000 small tensors of varied dtypes and shapes, written by SaveV2: a large index in miniature."""
    return _build(tmp_path_factory, "many", ckpts.build_many)


@pytest.fixture(scope="session")
def iterator_ckpts(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tf.data iterator checkpoint (a DT_VARIANT tensor whose shape varies from run to run): {"a"}."""
    return _build(tmp_path_factory, "iterators", ckpts.build_iterators)


@pytest.fixture(scope="session")
def tensor_list_ckpts(ckpts: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A scalar DT_VARIANT (a TensorList) that serializes the same way every run: {"a", "a2" (same), "b" (changed)}."""
    return _build(tmp_path_factory, "tensor_lists", ckpts.build_tensor_lists)
