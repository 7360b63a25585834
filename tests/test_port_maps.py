"""Port maps without TensorFlow: the file format, the exact transforms, and every refusal.

The end-to-end proof (tf-slim nets against torchvision and timm, equal logits)
is tests/test_ports.py, in the TensorFlow venv.  Here a tiny map and arrays
saved by ckptbridge itself pin down what the engine does with each rule.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import pytest

import ckptbridge
from ckptbridge import CkptBridgeError, FormatError, MismatchError, NotFoundError

from helpers import assert_one_line_error, cli, same

TINY_MAP = """
format = 1
name = "tiny"
net = "tiny_net"
destination = "torch.nn.Sequential(...)"
description = "a conv + batch norm, a fully connected layer stored as a 2x2 conv, and logits with a background class"
image_size = 8
classes = { source = 4, destination = 3 }
skip = ['^global_step$']

[[caveats]]
kind = "padding"
text = "an example caveat"
fix = "none needed"

[templates.conv_bn]
"weights" = { to = "conv.weight", transform = "conv" }
"BatchNorm/beta" = { to = "bn.bias" }
"BatchNorm/moving_mean" = { to = "bn.running_mean" }
"BatchNorm/moving_variance" = { to = "bn.running_var" }

[templates.conv_bn.add]
"bn.weight" = { fill = 1.0, like = "bn.running_mean" }
"bn.num_batches_tracked" = { fill = 0, dtype = "int64", shape = [], check = false }

[templates.fc_as_conv]
"weights" = { to = "weight", transform = "fc_as_conv" }
"biases" = { to = "bias" }

[templates.logits]
"weights" = { to = "weight", transform = "fc_as_conv", classes = true }
"biases" = { to = "bias", classes = true }

[[scopes]]
from = "tiny/conv1"
to = "0"
template = "conv_bn"

[[scopes]]
from = "tiny/fc2"
to = "2"
template = "fc_as_conv"
kernel = [2, 2]

[[scopes]]
from = "tiny/logits"
to = ""
template = "logits"
"""


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return {
        "tiny/conv1/weights": f(3, 3, 2, 5),
        "tiny/conv1/BatchNorm/beta": f(5),
        "tiny/conv1/BatchNorm/moving_mean": f(5),
        "tiny/conv1/BatchNorm/moving_variance": np.abs(f(5)) + 0.5,
        "tiny/fc2/weights": f(2, 2, 5, 6),
        "tiny/fc2/biases": f(6),
        "tiny/logits/weights": f(1, 1, 6, 4),
        "tiny/logits/biases": f(4),
        "global_step": np.array(7, np.int64),
    }


@pytest.fixture()
def tiny(tmp_path: Any) -> dict[str, Any]:
    m = tmp_path / "tiny.toml"
    m.write_text(TINY_MAP)
    arrays = _arrays()
    ckpt = str(tmp_path / "ck" / "model.ckpt")
    ckptbridge.save(arrays, ckpt)
    return {"map": str(m), "ckpt": ckpt, "arrays": arrays, "dir": tmp_path}


def test_every_builtin_map_parses_and_names_itself() -> None:
    maps = ckptbridge.port_maps()
    assert {"torchvision:vgg16", "torchvision:vgg19", "torchvision:googlenet", "torchvision:inception_v3", "timm:inception_v3"} <= set(maps)
    for name, m in maps.items():
        assert m.name == name and m.rules and m.net
        assert len({r.dest for r in m.rules} | {a.dest for a in m.added}) == len(m.rules) + len(m.added)


def test_export_gives_exact_destination_tensors(tiny: dict[str, Any]) -> None:
    out = str(tiny["dir"] / "o.safetensors")
    report = ckptbridge.export(tiny["ckpt"], out, ckptbridge.Port(tiny["map"]))
    a = tiny["arrays"]
    got = ckptbridge.load(out)
    assert sorted(got) == sorted(["0.conv.weight", "0.bn.bias", "0.bn.running_mean", "0.bn.running_var", "0.bn.weight",
                                  "0.bn.num_batches_tracked", "2.weight", "2.bias", "weight", "bias"])
    assert same(got["0.conv.weight"], np.ascontiguousarray(a["tiny/conv1/weights"].transpose(3, 2, 0, 1)))
    assert same(got["0.bn.bias"], a["tiny/conv1/BatchNorm/beta"])
    assert same(got["0.bn.weight"], np.ones(5, np.float32))
    assert same(got["0.bn.num_batches_tracked"], np.array(0, np.int64))
    # The background class (index 0 of the class axis) is dropped.
    assert same(got["weight"], np.ascontiguousarray(a["tiny/logits/weights"][0, 0, :, 1:].T))
    assert same(got["bias"], a["tiny/logits/biases"][1:])
    assert report.port == tiny["map"] and report.caveats == ["padding: an example caveat (to match TensorFlow: none needed)"]
    assert report.dropped == {"global_step": "skipped by port map tiny"}
    assert set(report.added) == {"0.bn.weight", "0.bn.num_batches_tracked"}
    assert ckptbridge.read(out).metadata()["port"]["map"] == "tiny"


def test_fc_as_conv_computes_what_the_conv_computed() -> None:
    """A [H,W,I,O] kernel applied as a VALID conv equals the Linear on torch.flatten of the NCHW input."""
    from ckptbridge.ports import plan as _ports

    rng = np.random.default_rng(1)
    k = rng.normal(size=(3, 2, 4, 5))
    x = rng.normal(size=(3, 2, 4))  # H, W, C: one position of a VALID conv
    conv = np.einsum("hwc,hwco->o", x, k)
    t, why = _ports._transform(_ports.Rule("s", "d", "fc_as_conv", kernel=(3, 2)), k.shape)
    assert why is None and t is not None
    linear = t.apply(k) @ x.transpose(2, 0, 1).reshape(-1)  # torch.flatten(x_nchw, 1)
    np.testing.assert_allclose(linear, conv, rtol=1e-12)
    assert same(t.invert(t.apply(k)), k)


def test_ema_is_read_first_and_slots_never(tiny: dict[str, Any]) -> None:
    a = dict(tiny["arrays"])
    ema = a["tiny/fc2/weights"] + 1
    a["tiny/fc2/weights/ExponentialMovingAverage"] = ema
    a["tiny/fc2/weights/Momentum"] = a["tiny/fc2/weights"] * 0
    ckpt = str(tiny["dir"] / "ema" / "model.ckpt")
    ckptbridge.save(a, ckpt)
    out = str(tiny["dir"] / "ema.npz")
    report = ckptbridge.export(ckpt, out, ckptbridge.Port(tiny["map"]))
    assert report.ema_swaps == {"2.weight": "tiny/fc2/weights/ExponentialMovingAverage"}
    assert report.dropped["tiny/fc2/weights/Momentum"].startswith("optimizer state")
    assert "EMA" in report.dropped["tiny/fc2/weights"]
    assert same(ckptbridge.load(out)["2.weight"], np.ascontiguousarray(ema.transpose(3, 2, 0, 1)).reshape(6, 20))


@pytest.mark.parametrize("classes", [None, 3])
def test_import_undoes_everything_and_restores_the_background_class(tiny: dict[str, Any], classes: int | None) -> None:
    exported = str(tiny["dir"] / "o.safetensors")
    ckptbridge.export(tiny["ckpt"], exported, ckptbridge.Port(tiny["map"]))
    back = str(tiny["dir"] / "back" / "model.ckpt")
    report = ckptbridge.rebuild(exported, back, ckptbridge.Port(tiny["map"], num_classes=classes))
    got = ckptbridge.load(back)
    a = tiny["arrays"]
    assert sorted(got) == sorted(n for n in a if n != "global_step")
    for name in got:
        if name.startswith("tiny/logits") and classes is None:
            assert same(got[name][..., 1:], a[name][..., 1:]) and not got[name][..., 0].any()
        elif name.startswith("tiny/logits"):
            assert same(got[name], np.ascontiguousarray(a[name][..., 1:]))  # 3 classes: no background
        else:
            assert same(got[name], a[name]), name
    assert report.dropped == {"0.bn.num_batches_tracked": "a counter the tf-slim net does not keep (port map tiny)",
                              "0.bn.weight": "all 1, as the tf-slim net assumes"}
    d = ckptbridge.diff(tiny["ckpt"], back)
    logits = ["tiny/logits/biases", "tiny/logits/weights"]
    assert d.only_a == ["global_step"] and sorted(d.value_diffs if classes is None else d.spec_diffs) == logits


def test_import_plans_classes_without_the_background_too(tiny: dict[str, Any]) -> None:
    from ckptbridge import ports as _ports

    exported = str(tiny["dir"] / "o.npz")
    ckptbridge.export(tiny["ckpt"], exported, ckptbridge.Port(tiny["map"]))
    with ckptbridge.read(exported) as r:
        src = r._source
        p = _ports.plan_import(src, _ports.load(tiny["map"]), num_classes=3)
        assert p.source.specs()["tiny/logits/weights"].shape == (1, 1, 6, 3)
        assert same(p.source.read("tiny/logits/biases"), tiny["arrays"]["tiny/logits/biases"][1:])
        with pytest.raises(MismatchError, match="not 7"):
            _ports.plan_import(src, _ports.load(tiny["map"]), num_classes=7)


def test_every_problem_is_listed_once_and_nothing_is_written(tiny: dict[str, Any]) -> None:
    a = dict(tiny["arrays"])
    del a["tiny/conv1/BatchNorm/beta"]                      # missing
    a["tiny/extra/weights"] = np.zeros(3, np.float32)        # unused
    a["tiny/fc2/weights"] = np.zeros((3, 3, 5, 6), np.float32)  # does not fit the 2x2 kernel
    ckpt = str(tiny["dir"] / "bad" / "model.ckpt")
    ckptbridge.save(a, ckpt)
    out = tiny["dir"] / "out"
    out.mkdir()
    with pytest.raises(MismatchError) as e:
        ckptbridge.export(ckpt, str(out / "o.npz"), ckptbridge.Port(tiny["map"]))
    msg = str(e.value)
    assert "missing from the checkpoint (1): tiny/conv1/BatchNorm/beta" in msg
    assert "not used by the map" in msg and "tiny/extra/weights" in msg
    assert "tiny/fc2/weights is [3, 3, 5, 6]" in msg
    r = cli("export", ckpt, str(out / "o.npz"), "--map", tiny["map"])
    assert_one_line_error(r, "port map tiny does not fit", "tiny/extra/weights")
    assert os.listdir(out) == []


def test_a_gamma_the_slim_net_cannot_hold_is_refused_on_import(tiny: dict[str, Any]) -> None:
    sd = ckptbridge.load(ckptbridge.export(tiny["ckpt"], str(tiny["dir"] / "o.npz"), ckptbridge.Port(tiny["map"])).output)
    sd["0.bn.weight"] = sd["0.bn.weight"] * 2
    sd["extra"] = np.zeros(1, np.float32)
    del sd["2.bias"]
    fine_tuned = str(tiny["dir"] / "ft.safetensors")
    ckptbridge.save(sd, fine_tuned)
    with pytest.raises(MismatchError) as e:
        ckptbridge.rebuild(fine_tuned, str(tiny["dir"] / "back" / "m.ckpt"), ckptbridge.Port(tiny["map"]))
    msg = str(e.value)
    assert "cannot carry" in msg and "0.bn.weight (must be all 1)" in msg
    assert "missing from the archive (1): 2.bias" in msg and "not used by the map" in msg and "extra" in msg
    assert not (tiny["dir"] / "back").exists()


def test_name_options_are_refused_beside_a_map(tiny: dict[str, Any]) -> None:
    out = str(tiny["dir"] / "o.npz")
    # the API takes a Port in the place of a Naming: the two cannot be given together
    with pytest.raises(TypeError):
        ckptbridge.export(tiny["ckpt"], out, ckptbridge.Port(tiny["map"]), naming=ckptbridge.Naming())  # type: ignore[misc]
    with pytest.raises(CkptBridgeError, match="Port.num_classes applies to an import"):
        ckptbridge.export(tiny["ckpt"], out, ckptbridge.Port(tiny["map"], num_classes=3))
    assert_one_line_error(cli("export", tiny["ckpt"], out, "--map", tiny["map"], "--weights-only"),
                          "--weights-only cannot be combined with --map")
    assert_one_line_error(cli("export", tiny["ckpt"], out, "--to", tiny["map"], "--rename", "a=b"), "--rename cannot be combined with --to")
    assert_one_line_error(cli("export", tiny["ckpt"], out, "--map", tiny["map"], "--to", "torchvision:vgg16"), "either --to or --map")
    assert_one_line_error(cli("export", tiny["ckpt"], out, "--to", "torchvision:nope"), "no port map named 'torchvision:nope'", "torchvision:vgg16")
    assert not os.path.exists(out)


def test_dry_run_prints_the_whole_mapping(tiny: dict[str, Any]) -> None:
    out = str(tiny["dir"] / "o.safetensors")
    r = cli("export", tiny["ckpt"], out, "--map", tiny["map"], "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "tiny/logits/weights -> weight" in lines
    assert "drop global_step: skipped by port map tiny" in lines
    assert any(line.startswith("layout weight: background class (index 0 of the class axis) dropped; fully connected") for line in lines)
    assert "add 0.bn.weight: filled with 1 (the tf-slim net has no such tensor)" in lines
    assert not any(line.endswith("-> 0.bn.weight") for line in lines)
    assert "caveat: padding: an example caveat (to match TensorFlow: none needed)" in lines
    assert not os.path.exists(out)


def test_maps_lists_the_builtin_maps() -> None:
    r = cli("maps", "--json")
    assert r.returncode == 0, r.stderr
    doc = {m["name"]: m for m in json.loads(r.stdout)}
    assert doc["torchvision:inception_v3"]["classes"] == {"source": 1001, "destination": 1000}
    assert [c["kind"] for c in doc["torchvision:inception_v3"]["caveats"]] == ["pooling"]
    # 8 maps before issue 25, then torchvision's resnet50/101/152 and vgg11, and Keras' ResNet50V2/101V2/152V2
    assert len(doc) == 15, sorted(doc)
    assert {"keras:ResNet50V2", "keras:ResNet101V2", "keras:ResNet152V2"} <= set(doc)
    assert {"torchvision:resnet50", "torchvision:resnet101", "torchvision:resnet152", "torchvision:vgg11"} <= set(doc)
    assert doc["torchvision:resnet152"]["net"] == "resnet_v1_152" and doc["torchvision:vgg11"]["net"] == "vgg_a"
    assert [c["kind"] for c in doc["torchvision:resnet50"]["caveats"]] == ["other", "padding"]
    text = cli("maps").stdout
    assert "torchvision:vgg16\n  net:         vgg_16 (tf-slim)" in text and "caveat (pooling)" in text
    assert "torchvision:resnet101\n  net:         resnet_v1_101 (tf-slim)" in text


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace("format = 1", "format = 2"), ["'format' must be 1"]),
    (lambda t: t.replace('transform = "conv"', 'transform = "conv2d"').replace('template = "fc_as_conv"', 'template = "nope"')
     .replace("image_size = 8", "image_sise = 8"),
     ["transform 'conv2d' is not one of", "no template named 'nope'", "unknown key 'image_sise'", "'image_size' must be a positive integer"]),
    (lambda t: t.replace('to = "2"', 'to = "0"'), []),  # distinct leaves: still valid
    (lambda t: t.replace('"biases" = { to = "bias" }', '"biases" = { to = "weight" }', 1), ["destination tensor 2.weight is produced 2 times"]),
    (lambda t: t.replace('like = "bn.running_mean"', 'like = "bn.running_meen"'), ["'like' names 0.bn.running_meen, which no rule produces"]),
    (lambda t: t.replace("source = 4, destination = 3", "source = 5, destination = 3"), ["must equal destination 3, or be one more"]),
    (lambda t: t + "\n[[caveats]]\nkind = \"speed\"\ntext = \"x\"\n", ["kind 'speed' is not one of"]),
    (lambda t: t.replace("format = 1", "format = 1\nformat = 1"), ["is not valid TOML"]),
    (lambda t: t.replace("format = 1", "format = true"), ["'format' must be 1"]),
    (lambda t: t.replace('like = "bn.running_mean" }', 'like = "bn.running_mean", dtype = "float16" }'), ["give either 'like'"]),
    (lambda t: t + '\n[templates.unused]\n"w" = { to = "x", transform = "rotate" }\n', ["templates.unused.w: transform 'rotate'"]),
    (lambda t: t.replace('description = "a conv', 'description = ""\nx = "a conv'), ["unknown key 'x'"]),
])
def test_a_bad_map_gets_every_problem_at_once(tmp_path: Any, edit: Any, needles: list[str]) -> None:
    path = tmp_path / "m.toml"
    path.write_text(edit(TINY_MAP))
    if not needles:
        ckptbridge.port_map(str(path))
        return
    with pytest.raises(FormatError) as e:
        ckptbridge.port_map(str(path))
    for n in needles:
        assert n in str(e.value)
    assert str(e.value).count("\n") == 0


def test_a_repeated_scope_expands_once_per_count(tmp_path: Any) -> None:
    """``repeat = [first, last]`` applies the template for every i from first to last, ``{i+K}`` counting from i."""
    text = TINY_MAP.replace('from = "tiny/conv1"\nto = "0"', 'from = "tiny/block/unit_{i+1}/conv1"\nto = "layer.{i}"\nrepeat = [0, 2]')
    path = tmp_path / "m.toml"
    path.write_text(text)
    m = ckptbridge.port_map(str(path))
    conv = [(r.source, r.dest) for r in m.rules if r.dest.endswith("conv.weight")]
    assert conv == [(f"tiny/block/unit_{i + 1}/conv1/weights", f"layer.{i}.conv.weight") for i in range(3)]
    assert [a.dest for a in m.added if a.dest.endswith("bn.weight")] == [f"layer.{i}.bn.weight" for i in range(3)]
    assert [a.like for a in m.added if a.dest.endswith("bn.weight")] == [f"layer.{i}.bn.running_mean" for i in range(3)]
    assert len(m.rules) == 3 * 4 + 4
    # The built-in resnets use it: resnet_v1_152's 50 units come from 8 scopes.
    r152 = ckptbridge.port_map("torchvision:resnet152")
    assert sum(1 for r in r152.rules if r.dest.endswith(".conv2.weight")) == 3 + 8 + 36 + 3
    assert "resnet_v1_152/block3/unit_36/bottleneck_v1/conv3/BatchNorm/gamma" in {r.source for r in r152.rules}


@pytest.mark.parametrize("scope, needle", [
    ('from = "tiny/u{i}/conv1"\nto = "0"', "needs 'repeat = [first, last]'"),
    ('from = "tiny/conv1"\nto = "0"\nrepeat = [0, 2]', "'repeat' needs '{i}'"),
    ('from = "tiny/u{i}/conv1"\nto = "0"\nrepeat = [3, 2]', "'repeat' must be [first, last]"),
    ('from = "tiny/u{i}/conv1"\nto = "0"\nrepeat = [0, true]', "'repeat' must be [first, last]"),
    ('from = "tiny/u{i-1}/conv1"\nto = "{i}"\nrepeat = [0, 2]', "would count below 0 from i = 0"),
    ('from = "tiny/u{i*2}/conv1"\nto = "{i}"\nrepeat = [0, 2]', "a placeholder other than {i}"),
    ('from = "tiny/u{i}/conv1"\nto = "0"\nrepeat = [0, 1]', "destination tensor 0.conv.weight is produced 2 times"),
])
def test_a_bad_repeat_is_refused(tmp_path: Any, scope: str, needle: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(TINY_MAP.replace('from = "tiny/conv1"\nto = "0"', scope))
    with pytest.raises(FormatError, match=re.escape(needle)):
        ckptbridge.port_map(str(path))


def test_unknown_map_names_the_builtins() -> None:
    with pytest.raises(NotFoundError, match="built-in maps are .*torchvision:vgg16"):
        ckptbridge.port_map("torchvision:vgg17")


def test_flatten_computes_what_the_conv_computed_in_keras_order() -> None:
    """Keras' Flatten on an NHWC activation meets a [H*W*in, out] Dense kernel: a plain reshape of [H,W,in,out]."""
    from ckptbridge.ports import plan as _ports

    rng = np.random.default_rng(2)
    k = rng.normal(size=(3, 2, 4, 5))
    x = rng.normal(size=(3, 2, 4))
    rule = _ports.Rule("s", "d", "flatten", kernel=(3, 2))
    t, why = _ports._transform(rule, k.shape)
    assert why is None and t is not None and t.to_shape == (24, 5)
    np.testing.assert_allclose(x.reshape(-1) @ t.apply(k), np.einsum("hwc,hwco->o", x, k), rtol=1e-12)
    assert _ports._source_shape(rule, t.to_shape) == k.shape and same(t.invert(t.apply(k)), k)


def test_the_package_root_gives_the_map_type_that_port_map_returns() -> None:
    """``ckptbridge.PortMap`` (in ``__all__``) is the type of what ``port_map`` and ``port_maps`` return."""
    assert isinstance(ckptbridge.port_map("torchvision:vgg16"), ckptbridge.PortMap)
    assert all(isinstance(m, ckptbridge.PortMap) for m in ckptbridge.port_maps().values())
