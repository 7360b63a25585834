"""Port maps without TensorFlow: a scope's counters, which number a template's destination names.

Keras numbers its layers per class in model order (``layers/conv2d_15/vars/0``), so a unit that
repeats across a stage needs numbers that grow by the unit's layer count, from where the stage
starts.  ``counters = { conv = [first, step] }`` on a scope gives ``{conv}`` (``{conv+K}``,
``{conv-K}``) in its template's ``to`` names; the built-in ``keras:ResNet*V2`` maps use them, and
tests/test_keras_resnet.py proves those maps by logits.
"""

from __future__ import annotations

from typing import Any

import pytest

import ckptbridge
from ckptbridge import FormatError

UNITS_MAP = """
format = 1
name = "units"
net = "tiny_resnet"
destination = "keras.Model(...)"
image_size = 8
classes = { source = 3, destination = 3 }

[templates.first]
"conv/weights" = { to = "layers/conv2d/vars/0" }

[templates.unit]
"bn/gamma" = { to = "layers/batch_normalization_{bn}/vars/0" }
"conv1/weights" = { to = "layers/conv2d_{conv}/vars/0" }
"conv2/weights" = { to = "layers/conv2d_{conv+1}/vars/0" }
"conv2/biases" = { to = "layers/conv2d_{conv+1}/vars/1" }

[templates.last]
"gamma" = { to = "layers/batch_normalization_{bn}/vars/0" }

[[scopes]]
from = "net/conv1"
to = ""
template = "first"

[[scopes]]
from = "net/block1/unit_{i}"
to = ""
template = "unit"
repeat = [1, 3]
counters = { conv = [1, 2], bn = [1, 1] }

[[scopes]]
from = "net/postnorm"
to = ""
template = "last"
counters = { bn = 4 }
"""


def _parse(tmp_path: Any, text: str) -> ckptbridge.PortMap:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return ckptbridge.port_map(str(path))


def test_counters_number_each_pass_from_first_by_step(tmp_path: Any) -> None:
    m = _parse(tmp_path, UNITS_MAP)
    got = {r.source: r.dest for r in m.rules}
    assert got == {
        "net/conv1/conv/weights": "layers/conv2d/vars/0",
        "net/block1/unit_1/bn/gamma": "layers/batch_normalization_1/vars/0",
        "net/block1/unit_1/conv1/weights": "layers/conv2d_1/vars/0",
        "net/block1/unit_1/conv2/weights": "layers/conv2d_2/vars/0",
        "net/block1/unit_1/conv2/biases": "layers/conv2d_2/vars/1",
        "net/block1/unit_2/bn/gamma": "layers/batch_normalization_2/vars/0",
        "net/block1/unit_2/conv1/weights": "layers/conv2d_3/vars/0",
        "net/block1/unit_2/conv2/weights": "layers/conv2d_4/vars/0",
        "net/block1/unit_2/conv2/biases": "layers/conv2d_4/vars/1",
        "net/block1/unit_3/bn/gamma": "layers/batch_normalization_3/vars/0",
        "net/block1/unit_3/conv1/weights": "layers/conv2d_5/vars/0",
        "net/block1/unit_3/conv2/weights": "layers/conv2d_6/vars/0",
        "net/block1/unit_3/conv2/biases": "layers/conv2d_6/vars/1",
        "net/postnorm/gamma": "layers/batch_normalization_4/vars/0",
    }
    assert [r.source for r in m.rules][1:5] == ["net/block1/unit_1/bn/gamma", "net/block1/unit_1/conv1/weights",
                                                "net/block1/unit_1/conv2/weights", "net/block1/unit_1/conv2/biases"]


def test_the_repeat_count_numbers_template_names_too(tmp_path: Any) -> None:
    text = UNITS_MAP.replace('"bn/gamma" = { to = "layers/batch_normalization_{bn}/vars/0" }',
                             '"bn/gamma" = { to = "layers/batch_normalization_{i+10}/vars/0" }').replace(", bn = [1, 1]", "")
    got = {r.source: r.dest for r in _parse(tmp_path, text).rules}
    assert got["net/block1/unit_2/bn/gamma"] == "layers/batch_normalization_12/vars/0"


def test_the_builtin_resnet_v2_maps_number_every_keras_layer_once() -> None:
    """Each ResNetV2 map's names are Keras' own: conv2d, conv2d_1 ... with no gap and no repeat (the
    Keras file's own keys are compared in tests/test_keras_resnet.py)."""
    for cls, units in (("ResNet50V2", 16), ("ResNet101V2", 33), ("ResNet152V2", 50)):
        m = ckptbridge.port_map(f"keras:{cls}")
        layers = {r.dest.rsplit("/vars/", 1)[0] for r in m.rules}
        convs = 1 + 3 * units + 4 + 1  # the root conv, 3 per unit, 4 shortcut convs; the Dense
        bns = 3 * units + 1
        assert layers == ({"layers/conv2d"} | {f"layers/conv2d_{n}" for n in range(1, convs - 1)} | {"layers/dense"}
                          | {"layers/batch_normalization"} | {f"layers/batch_normalization_{n}" for n in range(1, bns)})
        assert len(m.rules) == 4 * bns + (2 + 4 * units + 2 * 4) + 2  # 4 per batch norm; root conv, units (conv3 has a bias), shortcuts; Dense


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace("counters = { bn = 4 }", ""), ["scopes[2]: template 'last' names {bn}, which this scope does not count"]),
    (lambda t: t.replace("counters = { bn = 4 }", "counters = { bn = 4, bm = 5 }"), ["scopes[2]: counter 'bm' is not named by template 'last'"]),
    (lambda t: t.replace("counters = { bn = 4 }", "counters = { bn = -1 }"), ["counter 'bn' must be [first, step]"]),
    (lambda t: t.replace("counters = { bn = 4 }", "counters = { bn = [4, 1, 2] }"), ["counter 'bn' must be [first, step]"]),
    (lambda t: t.replace("counters = { bn = 4 }", "counters = { i = 4 }"), ["counter 'i' must be a lower-case name other than 'i'"]),
    (lambda t: t.replace("counters = { bn = 4 }", 'counters = "bn"'), ["'counters' must be a table"]),
    (lambda t: t.replace("{conv+1}/vars/0", "{conv-2}/vars/0"), ["counts below 0 (conv = 1)"]),
    (lambda t: t.replace("counters = { conv = [1, 2], bn = [1, 1] }", "counters = { conv = [1, 0], bn = [1, 1] }"),
     ["destination tensor layers/conv2d_1/vars/0 is produced 3 times"]),
])
def test_a_bad_counter_is_named_with_its_scope(tmp_path: Any, edit: Any, needles: list[str]) -> None:
    with pytest.raises(FormatError) as e:
        _parse(tmp_path, edit(UNITS_MAP))
    for n in needles:
        assert n in str(e.value)
