"""The proof of the PyTorch handoff: a tf-slim net and its torch.nn twin compute the same thing.

TensorFlow builds and runs a small slim net (conv2d with stride 2 and SAME
padding, separable_conv2d with depth multiplier 2, batch_norm, fully_connected)
on a fixed input and saves it; ckptbridge exports it with ``--layout torch``
(kernels told apart by the slim graph, ``--model``) and torch-style names; the
arrays are loaded into the equivalent ``torch.nn`` model with
``load_state_dict``; outputs agree within 1e-5.  Then the archive is imported
back and must equal the original checkpoint bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")

from ckptbridge import diff, read  # noqa: E402
from ckptbridge.cli import main  # noqa: E402

pytestmark = pytest.mark.tf

SIZE = 16  # input is [N, 16, 16, 3]
EPS = 1e-3  # slim.batch_norm's default epsilon


def slim_net(num_classes: int | None = None) -> Any:
    """The tf-slim net, built in the default graph (also the --model for export)."""
    import tensorflow as tf

    from ckptbridge.tf.compat import import_slim

    slim = import_slim()
    images = tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3], name="images")
    net = slim.conv2d(images, 8, [3, 3], stride=2, padding="SAME", scope="conv1")  # 16 -> 8, pads 0 top/left, 1 bottom/right
    net = slim.separable_conv2d(net, 12, [3, 3], depth_multiplier=2, padding="SAME", scope="sep")
    net = slim.batch_norm(net, is_training=False, scope="bn")  # center=True, scale=False: no gamma
    net = slim.flatten(net)  # NHWC order
    return slim.fully_connected(net, num_classes or 10, activation_fn=None, scope="fc")


def _build_checkpoint(directory: str) -> tuple[str, np.ndarray, np.ndarray]:
    """Save the net with non-trivial BN statistics; return (prefix, input, TF output)."""
    import tensorflow as tf

    rng = np.random.default_rng(7)
    graph = tf.Graph()
    with graph.as_default():
        logits = slim_net()
        variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            # Non-trivial BN state, fed through the variables' own initializer path (no graph constants).
            variables["bn/moving_mean"].load(rng.normal(size=12).astype(np.float32), sess)
            variables["bn/moving_variance"].load(rng.uniform(0.5, 2.0, size=12).astype(np.float32), sess)
            variables["bn/beta"].load(rng.normal(size=12).astype(np.float32), sess)
            for name in ("conv1/biases", "sep/biases", "fc/biases"):
                variables[name].load(rng.normal(size=variables[name].shape).astype(np.float32), sess)
            x = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
            y = sess.run(logits, {graph.get_tensor_by_name("images:0"): x})
            prefix = os.path.join(directory, "model.ckpt")
            saver.save(sess, prefix, write_meta_graph=False)
    return prefix, x, y


class TorchNet(torch.nn.Module):
    """The same net in torch.nn, NCHW."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=0)
        self.sep_dw = torch.nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)
        self.sep_pw = torch.nn.Conv2d(16, 12, 1)
        self.bn = torch.nn.BatchNorm2d(12, eps=EPS)
        self.fc = torch.nn.Linear(8 * 8 * 12, 10)

    def forward(self, x: Any) -> Any:
        # TF's SAME with stride 2 on an even size pads only after (bottom/right).
        x = torch.relu(self.conv1(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        x = torch.relu(self.sep_pw(self.sep_dw(x)))
        x = self.bn(x)
        # slim.flatten flattens NHWC: go back to that order before the dense layer.
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.fc(x)


RENAMES = [
    r"^sep/depthwise_weights$=sep_dw/weights",
    r"^sep/(pointwise_weights|biases)$=sep_pw/\1",
    r"/(weights|pointwise_weights)$=.weight",
    r"/(biases|beta)$=.bias",
]


@pytest.fixture(scope="module")
def model_ckpt(module_tmp: Any) -> tuple[str, np.ndarray, np.ndarray]:
    return _build_checkpoint(str(module_tmp("torchnet")))


def _export(prefix: str, out: str, extra: list[str]) -> None:
    args = ["export", prefix, out, "--layout", "torch", "--model", "test_handoff_torch:slim_net", "-q"]
    for r in RENAMES:
        args += ["--rename", r]
    assert main(args + extra) == 0


def test_torch_model_computes_what_tensorflow_computes(model_ckpt: tuple[str, np.ndarray, np.ndarray], tmp_path: Any) -> None:
    prefix, x, y_tf = model_ckpt
    rename_file = tmp_path / "bn.json"
    rename_file.write_text(json.dumps({"bn/moving_mean": "bn.running_mean", "bn/moving_variance": "bn.running_var"}))
    out = str(tmp_path / "model.safetensors")
    _export(prefix, out, ["--rename-file", str(rename_file)])

    from safetensors.torch import load_file

    state = load_file(out)
    net = TorchNet()
    result = net.load_state_dict(state, strict=False)
    # slim.batch_norm without scale=True has no gamma: torch's default weight of ones is exactly that.
    assert result.missing_keys == ["bn.weight"]  # num_batches_tracked is optional in torch 2.x
    assert result.unexpected_keys == []
    net.eval()
    with torch.no_grad():
        y_torch = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert y_torch.shape == y_tf.shape
    np.testing.assert_allclose(y_torch, y_tf, rtol=0, atol=1e-5)
    # The test can fail: without the layout change the same weights give other outputs.
    assert np.abs(y_tf).max() > 1e-3


def test_graph_decides_the_transforms(model_ckpt: tuple[str, np.ndarray, np.ndarray], tmp_path: Any) -> None:
    prefix, _, _ = model_ckpt
    out = str(tmp_path / "m.npz")
    cb = __import__("ckptbridge")
    report = cb.export(prefix, out, cb.Naming(layout=cb.Layout("torch", model="test_handoff_torch:slim_net")))
    kinds = {n: d.split(" ")[0] for n, d in report.layout.items()}
    assert kinds == {"conv1/weights": "conv", "sep/depthwise_weights": "depthwise", "sep/pointwise_weights": "conv", "fc/weights": "dense"}
    assert "graph: Conv2D" in report.layout["conv1/weights"]
    assert "graph: DepthwiseConv2dNative" in report.layout["sep/depthwise_weights"]
    assert "graph: MatMul" in report.layout["fc/weights"]


@pytest.mark.parametrize("engine_model", [None, "test_handoff_torch:slim_net"])
def test_import_undoes_layout_and_names_bit_exact(model_ckpt: tuple[str, np.ndarray, np.ndarray], tmp_path: Any, engine_model: str | None) -> None:
    prefix, _, _ = model_ckpt
    out = str(tmp_path / "model.safetensors")
    _export(prefix, out, [])
    back = str(tmp_path / "back" / "model.ckpt")
    args = ["import", out, back, "--original-names", "-q"]
    if engine_model:
        args += ["--model", engine_model]
    assert main(args) == 0
    d = diff(prefix, back)
    assert d.identical, (d.only_a, d.only_b, d.spec_diffs, d.value_diffs)
    with read(back) as r:
        assert sorted(r) == sorted(read(prefix).specs)
