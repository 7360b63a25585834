"""Renames, --dry-run and --layout torch: parsing, policies, metadata, and exact round trips.

Most tests need no TensorFlow: the source is a plain ``.npz`` (any archive is a
source), and graph-free import writes the checkpoint with the native engine.
The graph-based layout choice is tested against a real tf-slim graph.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptbridge
from ckptbridge.cli import _load_rename_file as load_rename_file
from ckptbridge.cli import main
from ckptbridge.errors import CkptBridgeError, CorruptError, FormatError
from ckptbridge.pipe import layout as lay
from ckptbridge.pipe.names import parse_rename, rename_map
from ckptbridge.spec import TensorSpec

from helpers import assert_one_line_error, cli, same


def _bits(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """float32 with arbitrary bit patterns (NaN payloads, -0.0, denormals): only exact copies survive."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32).view(np.float32)


TENSORS = {
    "net/conv1/weights": _bits((3, 3, 3, 8), 1),
    "net/conv1/biases": _bits((8,), 2),
    "net/sep/depthwise_weights": _bits((3, 3, 8, 2), 3),
    "net/sep/pointwise_weights": _bits((1, 1, 16, 4), 4),
    "net/fc/weights": _bits((64, 10), 5),
    "net/fc/weights/ExponentialMovingAverage": _bits((64, 10), 6),
    "net/fc/biases": _bits((10,), 7),
    "net/embedding": _bits((5, 3), 8),
    "global_step": np.array(7, dtype=np.int64),
}


@pytest.fixture()
def src_npz(tmp_path: Any) -> str:
    path = str(tmp_path / "src.npz")
    np.savez(path, **TENSORS)
    return path


# --- rename rules -----------------------------------------------------------------


def test_rename_splits_at_last_equals_so_regex_may_hold_lookarounds() -> None:
    rule = parse_rename("(?<=net/)fc(?=/)=dense")
    assert rule.pattern.pattern == "(?<=net/)fc(?=/)"
    assert rule.apply("net/fc/weights") == "net/dense/weights"
    assert parse_rename("a=b=c").pattern.pattern == "a=b" and parse_rename("a=b=c").replacement == "c"


def test_rename_replacement_may_be_empty_and_use_groups() -> None:
    assert parse_rename("^net/=").apply("net/fc/weights") == "fc/weights"
    assert parse_rename(r"^(\w+)/(\w+)$=\2.\1").apply("fc/weights") == "weights.fc"


@pytest.mark.parametrize(
    "rule, words",
    [
        ("no-equals-sign", "REGEX=REPLACEMENT"),
        ("=x", "empty regex"),
        ("([=x", "not a valid regular expression"),
    ],
)
def test_malformed_rename_rules_are_refused(rule: str, words: str) -> None:
    with pytest.raises(FormatError, match=words) as e:
        parse_rename(rule)
    assert rule in str(e.value)


def test_bad_group_reference_names_the_rule() -> None:
    with pytest.raises(FormatError, match=r"rename rule 'fc=\\\\2'.*group"):
        rename_map(["net/fc"], rules=[r"fc=\2"])


def test_two_names_to_one_is_an_error_naming_both() -> None:
    with pytest.raises(FormatError) as e:
        rename_map(["a/weights", "b/weights"], rules=["^[ab]/=x/"])
    assert "'a/weights'" in str(e.value) and "'b/weights'" in str(e.value) and "'x/weights'" in str(e.value)


def test_rename_to_empty_is_an_error() -> None:
    with pytest.raises(FormatError, match="empty name"):
        rename_map(["abc"], rules=["^abc$="])


def test_rename_file_first_then_rules_in_order() -> None:
    out = rename_map(["a", "b", "c"], exact={"a": "x"}, rules=["x=y", "y=z", "b=bb"])
    assert out == {"a": "z", "b": "bb", "c": "c"}


def test_rename_file_with_unknown_names_is_refused(src_npz: str, tmp_path: Any) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"net/conv1/weightz": "x"}))
    with pytest.raises(FormatError, match="weightz"):
        ckptbridge.export(src_npz, str(tmp_path / "o.npz"), ckptbridge.Naming(rename=ckptbridge.Rename(exact=json.loads(f.read_text()))))
    assert not os.path.exists(tmp_path / "o.npz")
    assert main(["export", src_npz, str(tmp_path / "o.npz"), "--rename-file", str(f)]) == 2
    assert not os.path.exists(tmp_path / "o.npz")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"a": 1}'])
def test_rename_file_must_be_a_json_object_of_strings(src_npz: str, tmp_path: Any, text: str) -> None:
    f = tmp_path / "r.json"
    f.write_text(text)
    with pytest.raises(FormatError, match="rename-file"):
        load_rename_file(str(f))
    assert main(["export", src_npz, str(tmp_path / "o.npz"), "--rename-file", str(f)]) == 2
    with pytest.raises(FormatError, match="strings"):
        ckptbridge.export(src_npz, str(tmp_path / "o.npz"), ckptbridge.Naming(rename=ckptbridge.Rename(exact={"a": 1})))  # type: ignore[dict-item]


def test_cli_malformed_rule_is_one_error_line(src_npz: str, tmp_path: Any, capsys: Any) -> None:
    assert main(["export", src_npz, str(tmp_path / "o.npz"), "--rename", "oops"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckptbridge: error: --rename rule 'oops'")


# --- renames in export and import ---------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(src_npz: str, tmp_path: Any, capsys: Any) -> None:
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    rc = main(["export", src_npz, str(out), "--weights-only", "--use-ema", "--rename", "^net/=", "--rename", "/weights$=.weight",
               "--layout", "torch", "--dry-run", "-q"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert "net/fc/weights -> fc.weight" in lines
    assert "net/conv1/biases -> conv1/biases" in lines
    assert "drop global_step: optimizer state (weights only)" in lines
    assert "ema: fc.weight <- net/fc/weights/ExponentialMovingAverage" in lines
    assert any(line.startswith("layout conv1.weight: conv HWIO->OIHW [3, 3, 3, 8] -> [8, 3, 3, 3]") for line in lines)
    assert lines[-1].startswith("dry run: would write 7 tensors")
    assert os.listdir(out.parent) == []


def test_dry_run_still_refuses_what_the_real_run_would(src_npz: str, tmp_path: Any) -> None:
    existing = tmp_path / "o.npz"
    existing.write_bytes(b"x")
    with pytest.raises(CkptBridgeError, match="already exists"):
        ckptbridge.export(src_npz, str(existing), dry_run=True)
    with pytest.raises(FormatError, match="two tensors"):
        ckptbridge.export(src_npz, str(tmp_path / "p.npz"), ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^.*$', 'x')])), dry_run=True)


def test_renames_apply_after_filters_and_ema(src_npz: str, tmp_path: Any) -> None:
    out = str(tmp_path / "o.npz")
    # --exclude sees the checkpoint's names, not the renamed ones.
    naming = ckptbridge.Naming(select=ckptbridge.Select(exclude=["embedding"], weights_only=True, use_ema=True),
                               rename=ckptbridge.Rename(rules=[('^net/', ''), ('/', '.')]))
    report = ckptbridge.export(src_npz, out, naming)
    assert report.renamed["net/fc/weights"] == "fc.weights"
    with ckptbridge.read(out) as r:
        assert sorted(r) == ["conv1.biases", "conv1.weights", "fc.biases", "fc.weights", "sep.depthwise_weights", "sep.pointwise_weights"]
        assert same(r["fc.weights"], TENSORS["net/fc/weights/ExponentialMovingAverage"])
        md = r.metadata()
    assert md["original_names"]["fc.weights"] == "net/fc/weights"
    assert md["ema_swaps"] == {"fc.weights": "net/fc/weights/ExponentialMovingAverage"}
    assert "layout" not in md


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors"])
def test_original_names_restore_on_import(src_npz: str, tmp_path: Any, fmt: str) -> None:
    pytest.importorskip("safetensors") if fmt == "safetensors" else None
    out = str(tmp_path / f"o.{fmt}")
    ckptbridge.export(src_npz, out, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^net/', 'torch.'), ('/', '.')])))
    plain = str(tmp_path / "plain" / "m.ckpt")
    ckptbridge.rebuild(out, plain, engine="native")
    with ckptbridge.read(plain) as r:
        assert "torch.fc.weights" in r and "net/fc/weights" not in r
    restored = str(tmp_path / "restored" / "m.ckpt")
    report = ckptbridge.rebuild(out, restored, ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)), engine="native")
    assert report.renamed["torch.fc.weights"] == "net/fc/weights"
    with ckptbridge.read(restored) as r:
        assert sorted(r) == sorted(TENSORS)
        for name, want in TENSORS.items():
            assert same(r[name], want), name


def test_import_renames_after_original_names_and_filters(src_npz: str, tmp_path: Any) -> None:
    out = str(tmp_path / "o.npz")
    ckptbridge.export(src_npz, out, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^net/', 'torch/')])))
    back = str(tmp_path / "b" / "m.ckpt")
    naming = ckptbridge.Naming(select=ckptbridge.Select(include=["^net/fc/"]),
                               rename=ckptbridge.Rename(rules=[('^net/', 'model/')], original_names=True))
    ckptbridge.rebuild(out, back, naming, engine="native")
    with ckptbridge.read(back) as r:
        assert sorted(r) == ["model/fc/biases", "model/fc/weights", "model/fc/weights/ExponentialMovingAverage"]


def test_import_dry_run_writes_nothing(src_npz: str, tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "o.npz")
    ckptbridge.export(src_npz, out, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^net/', 't.')]), layout=ckptbridge.Layout("torch")))
    target = tmp_path / "ck"
    assert main(["import", out, str(target / "m.ckpt"), "--original-names", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "t.fc/weights -> net/fc/weights" in lines
    assert any(line.startswith("layout net/fc/weights: undo dense") for line in lines)
    assert not target.exists()


# --- layout ------------------------------------------------------------------------


shapes4 = st.tuples(*[st.integers(0, 4)] * 4)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([lay.CONV, lay.DEPTHWISE, lay.DENSE]), shape=shapes4, rank=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_every_transform_inverts_bit_exact(kind: str, shape: tuple[int, ...], rank: int, seed: int) -> None:
    shape = (shape + (2, 3))[:rank]
    t = lay.transform_for(kind, shape)
    if t is None:
        assert (kind, rank) not in {(lay.DENSE, 2), (lay.DEPTHWISE, 4)} and not (kind == lay.CONV and 3 <= rank <= 5)
        return
    x = _bits(shape, seed)
    y = t.apply(x)
    assert y.shape == t.to_shape and y.flags.c_contiguous
    assert same(t.invert(y), x)
    assert lay.Transform.from_record(json.loads(json.dumps(t.to_record())), "x") == t


def test_transforms_match_pytorch_conventions() -> None:
    w = _bits((3, 5, 4, 6))  # H W I O
    conv = lay.transform_for(lay.CONV, w.shape).apply(w)
    assert conv.shape == (6, 4, 3, 5) and same(conv[5, 3, 2, 4], w[2, 4, 3, 5])
    d = _bits((3, 5, 4, 2))  # H W C M -> grouped conv: output channel c*M + m belongs to group c
    dw = lay.transform_for(lay.DEPTHWISE, d.shape).apply(d)
    assert dw.shape == (8, 1, 3, 5)
    for c in range(4):
        for m in range(2):
            assert same(dw[c * 2 + m, 0], d[:, :, c, m])
    fc = _bits((7, 3))
    assert same(lay.transform_for(lay.DENSE, fc.shape).apply(fc), np.ascontiguousarray(fc.T))


@pytest.mark.parametrize(
    "name, shape, kind",
    [
        ("a/conv1/weights", (3, 3, 3, 8), lay.CONV),
        ("a/fc/weights", (10, 5), lay.DENSE),
        ("dense/kernel/.ATTRIBUTES/VARIABLE_VALUE", (10, 5), lay.DENSE),
        ("a/sep/depthwise_weights", (3, 3, 8, 1), lay.DEPTHWISE),
        ("conv/depthwise_kernel", (3, 3, 8, 1), lay.DEPTHWISE),
        ("a/sep/pointwise_weights", (1, 1, 8, 4), lay.CONV),
        ("a/conv1/weights/ExponentialMovingAverage", (3, 3, 3, 8), lay.CONV),
        ("a/conv1d/kernel", (5, 3, 8), lay.CONV),
        ("a/conv1/biases", (8,), None),
        ("a/embedding", (100, 16), None),
        ("a/weights", (8,), None),
        ("a/depthwise_weights", (3, 3, 8), None),
    ],
)
def test_kind_by_convention(name: str, shape: tuple[int, ...], kind: str | None) -> None:
    assert lay.kind_by_convention(name, TensorSpec(name, "float32", shape))[0] == kind


@pytest.mark.parametrize("fmt", ["npz", "h5", "safetensors"])
def test_layout_recorded_and_undone_on_graph_free_import(src_npz: str, tmp_path: Any, fmt: str) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    out = str(tmp_path / f"o.{fmt}")
    report = ckptbridge.export(src_npz, out, ckptbridge.Naming(layout=ckptbridge.Layout("torch")))
    assert set(report.layout) >= {"net/conv1/weights", "net/fc/weights", "net/sep/depthwise_weights", "net/sep/pointwise_weights"}
    assert report.layout["net/embedding"].startswith("unchanged")
    with ckptbridge.read(out) as r:
        assert r.specs["net/conv1/weights"].shape == (8, 3, 3, 3)
        assert r.specs["net/sep/depthwise_weights"].shape == (16, 1, 3, 3)
        assert same(r["net/fc/weights"], np.ascontiguousarray(TENSORS["net/fc/weights"].T))
        # The EMA shadow follows its variable's layout.
        assert r.specs["net/fc/weights/ExponentialMovingAverage"].shape == (10, 64)
        md = r.metadata()["layout"]
    assert md["convention"] == "torch"
    depthwise = {"kind": "depthwise", "perm": [2, 3, 0, 1], "from_shape": [3, 3, 8, 2], "to_shape": [16, 1, 3, 3]}
    assert md["tensors"]["net/sep/depthwise_weights"] == depthwise
    back = str(tmp_path / "b" / "m.ckpt")
    ckptbridge.rebuild(out, back, engine="native")
    with ckptbridge.read(back) as r:
        for name, want in TENSORS.items():
            assert same(r[name], want), name


def test_layout_survives_archive_to_archive_and_is_not_applied_twice(src_npz: str, tmp_path: Any) -> None:
    a = str(tmp_path / "a.npz")
    ckptbridge.export(src_npz, a, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^net/', 'm.')]), layout=ckptbridge.Layout("torch")))
    with pytest.raises(FormatError, match="already in torch layout"):
        ckptbridge.export(a, str(tmp_path / "b.npz"), ckptbridge.Naming(layout=ckptbridge.Layout("torch")))
    b = str(tmp_path / "b.h5")
    ckptbridge.export(a, b, ckptbridge.Naming(rename=ckptbridge.Rename(rules=[('^m\\.', 'n.')])))
    with ckptbridge.read(b) as r:
        assert r.metadata()["original_names"]["n.fc/weights"] == "net/fc/weights"
        assert r.metadata()["layout"]["tensors"]["n.fc/weights"]["kind"] == "dense"
    back = str(tmp_path / "c" / "m.ckpt")
    ckptbridge.rebuild(b, back, ckptbridge.Naming(rename=ckptbridge.Rename(original_names=True)), engine="native")
    with ckptbridge.read(back) as r:
        for name, want in TENSORS.items():
            assert same(r[name], want), name


@pytest.mark.parametrize(
    "rec",
    [
        {"kind": "conv", "perm": [0, 0, 1, 2], "from_shape": [1, 2, 3, 4], "to_shape": [4, 3, 2, 1]},
        {"kind": "conv", "perm": [3, 2, 0, 1], "from_shape": [1, 2, 3, 4], "to_shape": [4, 3, 2, 2]},
        {"kind": "conv", "perm": "3201", "from_shape": [1], "to_shape": [1]},
        {"perm": [0], "from_shape": [1], "to_shape": [1]},
    ],
)
def test_damaged_layout_records_are_refused(rec: dict[str, Any]) -> None:
    with pytest.raises(CorruptError):
        lay.Transform.from_record(rec, "archive")


def test_model_without_layout_is_refused(src_npz: str, tmp_path: Any) -> None:
    # the API has no place for a model without a Layout; the command line refuses --model alone
    assert_one_line_error(cli("export", src_npz, str(tmp_path / "o.npz"), "--model", "vgg_16"), "--model on export only tells --layout",
                          "add --layout torch")
    assert not (tmp_path / "o.npz").exists()


# --- graph-based choice (TensorFlow) ----------------------------------------------------


def odd_net(num_classes: int | None = None) -> Any:
    """A net whose kernels do not follow the naming conventions: only the graph knows what they are."""
    import tensorflow as tf

    x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 2])
    f = tf.compat.v1.get_variable("odd/filt", [3, 3, 2, 4])
    y = tf.nn.conv2d(x, f, strides=1, padding="SAME")
    dw = tf.compat.v1.get_variable("odd/dw", [3, 3, 4, 2])
    y = tf.nn.depthwise_conv2d(y, dw, strides=[1, 1, 1, 1], padding="SAME")
    m = tf.compat.v1.get_variable("odd/proj", [6 * 6 * 8, 3])
    tf.compat.v1.get_variable("odd/weights", [4, 4])  # named like a kernel, but unused
    return tf.matmul(tf.reshape(y, [-1, 6 * 6 * 8]), m)


@pytest.mark.tf
def test_graph_overrides_conventions(tmp_path: Any) -> None:
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_slim")
    path = str(tmp_path / "odd.npz")
    arrays = {"odd/filt": _bits((3, 3, 2, 4)), "odd/dw": _bits((3, 3, 4, 2), 1), "odd/proj": _bits((288, 3), 2), "odd/weights": _bits((4, 4), 3)}
    np.savez(path, **arrays)
    by_names = ckptbridge.export(path, str(tmp_path / "a.npz"), ckptbridge.Naming(layout=ckptbridge.Layout("torch")))
    assert set(by_names.layout) == {"odd/filt", "odd/dw", "odd/proj", "odd/weights"}
    assert by_names.layout["odd/weights"].startswith("dense")  # the convention's guess
    assert by_names.layout["odd/filt"].startswith("unchanged")
    by_graph = ckptbridge.export(path, str(tmp_path / "b.npz"), ckptbridge.Naming(layout=ckptbridge.Layout("torch", model="test_handoff:odd_net")))
    assert by_graph.layout["odd/filt"].startswith("conv") and "graph: Conv2D" in by_graph.layout["odd/filt"]
    assert by_graph.layout["odd/dw"].startswith("depthwise") and "DepthwiseConv2dNative" in by_graph.layout["odd/dw"]
    assert by_graph.layout["odd/proj"].startswith("dense") and "MatMul" in by_graph.layout["odd/proj"]
    assert by_graph.layout["odd/weights"] == "unchanged (graph: not a kernel)"
    back = str(tmp_path / "c" / "m.ckpt")
    ckptbridge.rebuild(str(tmp_path / "b.npz"), back, engine="native")
    with ckptbridge.read(back) as r:
        for name, want in arrays.items():
            assert same(r[name], want), name
