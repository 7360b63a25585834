"""The tf-slim / tf-keras shim: every tf-slim net builds on current TensorFlow, and the shim is needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")

from ckptbridge.tf.compat import import_slim, import_tensorflow  # noqa: E402
from ckptbridge.tf.slim import NETS  # noqa: E402

pytestmark = pytest.mark.tf

# The families whose nets use batch norm; every family of slim.NETS must be in exactly one of these.
BATCH_NORM = {"tf_slim.nets.resnet_v1", "tf_slim.nets.resnet_v2", "tf_slim.nets.inception"}
NO_BATCH_NORM = {"tf_slim.nets.vgg", "tf_slim.nets.alexnet", "tf_slim.nets.overfeat"}

# Conv/fc weights (plus the logits) each net must have: a floor that catches a net built half-way.
MIN_WEIGHTS = {"vgg_a": 11, "vgg_16": 16, "vgg_19": 19, "alexnet_v2": 8, "overfeat": 8,
               "inception_v1": 58, "inception_v2": 69, "inception_v3": 95}


# Graph construction in tf-keras' legacy layers is quadratic in the number of variables
# (add_weight builds set(global_variables()) for every weight): resnet_v*_200 (1017
# variables) costs about 25 s of CPU each and resnet_v*_152 about 15 s, against 5 s for
# resnet_v*_50.  Their blocks are those of resnet_v*_50/101 (only the unit counts
# differ), so they run with the slow cases (scripts/test --slow).
_SLOW = {"resnet_v1_152", "resnet_v2_152", "resnet_v1_200", "resnet_v2_200"}


@pytest.mark.parametrize("net", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(NETS)])
def test_every_slim_net_builds(net):
    import importlib

    tf = import_tensorflow()
    slim = import_slim()
    info = NETS[net]
    uses_bn = info.module in BATCH_NORM
    module = importlib.import_module(info.module)
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [1, info.image_size, info.image_size, 3])
        with slim.arg_scope(getattr(module, info.arg_scope)()):
            logits, ends = getattr(module, info.function)(images, num_classes=10, is_training=False)
        variables = tf.compat.v1.global_variables()
        names = [v.op.name for v in variables]
    assert len(variables) > 0
    assert logits.shape[-1] == 10
    assert all(n.split("/")[0] for n in names)
    weights = [n for n in names if n.endswith("/weights")]
    assert len(weights) >= MIN_WEIGHTS.get(net, 50), f"{net}: only {len(weights)} weight tensors"
    moving = [n for n in names if n.endswith("BatchNorm/moving_mean")]
    if uses_bn:
        assert moving, f"{net} should have batch-norm moving statistics"
    else:
        assert not moving


def test_the_expectations_here_name_only_known_nets_and_families():
    """A net added to slim.NETS gets a batch-norm expectation here; a stale name here fails."""
    assert {info.module for info in NETS.values()} <= BATCH_NORM | NO_BATCH_NORM and not BATCH_NORM & NO_BATCH_NORM
    assert set(MIN_WEIGHTS) <= set(NETS) and _SLOW <= set(NETS)


def test_import_slim_is_idempotent():
    a = import_slim()
    b = import_slim()
    assert a is b
    import tf_keras.src.legacy_tf_layers as src

    assert sys.modules["tf_keras.legacy_tf_layers"] is src


_BATCH_NORM = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    {setup}
    import tensorflow as tf
    import tf_slim as slim
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [1, 4, 4, 3])
        try:
            slim.batch_norm(x)
        except ModuleNotFoundError as e:
            print("FAILED", e.name)
            sys.exit(0)
        print("BUILT", sorted(v.op.name for v in tf.compat.v1.global_variables()))
    """
)


def _run(setup: str) -> str:
    proc = subprocess.run([sys.executable, "-c", _BATCH_NORM.format(setup=setup)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_shim_is_needed_for_batch_norm():
    """Fresh interpreters: without the shim batch_norm fails on the missing module; with it, it builds."""
    without = _run("")
    assert without.startswith("FAILED tf_keras.legacy_tf_layers"), without
    with_shim = _run("from ckptbridge.tf.compat import import_slim; import_slim()")
    assert with_shim == "BUILT ['BatchNorm/beta', 'BatchNorm/moving_mean', 'BatchNorm/moving_variance']", with_shim
