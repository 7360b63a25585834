"""Which variables of a tf-slim net are conv, depthwise or dense kernels, from its graph.

The pure transforms live in :mod:`ckptbridge.pipe.layout`; this module builds the
net's graph (TensorFlow and tf-slim) and follows each variable to the ops that
consume it, so that ``--layout`` with ``--model`` decides by what the net does
with a tensor rather than by its name.
"""

from __future__ import annotations

from typing import Any

from ..pipe.layout import CONV, DENSE, DEPTHWISE
from ..spec import TensorSpec
from .compat import import_tensorflow
from .slim import build_net

# Graph ops whose input 1 is a kernel in TensorFlow's layout, by kind.
_CONV_OPS = {"Conv2D", "Conv3D", "Conv2DBackpropInput", "Conv3DBackpropInputV2", "Conv1D"}
_DEPTHWISE_OPS = {"DepthwiseConv2dNative"}
_DENSE_OPS = {"MatMul"}
# Ops a kernel may pass through on its way to the op that uses it.
_PASSTHROUGH = {"ReadVariableOp", "Identity", "Enter", "Cast", "ExpandDims", "Switch", "Merge"}


def graph_kinds(model: str, num_classes: int | None, specs: dict[str, TensorSpec]) -> dict[str, tuple[str | None, str]]:
    """variable name -> (kind or None, why), from the ops that use each variable of a tf-slim net."""
    tf = import_tensorflow()
    graph, _, _ = build_net(model, num_classes, specs)
    out: dict[str, tuple[str | None, str]] = {}
    with graph.as_default():
        for var in tf.compat.v1.global_variables():
            uses = _uses(var.op.outputs[0])
            kinds = set()
            for op_type, index in uses:
                if index != 1:
                    continue
                if op_type in _CONV_OPS:
                    kinds.add(CONV)
                elif op_type in _DEPTHWISE_OPS:
                    kinds.add(DEPTHWISE)
                elif op_type in _DENSE_OPS:
                    kinds.add(DENSE)
            ops = ", ".join(sorted({t for t, i in uses if t in _CONV_OPS | _DEPTHWISE_OPS | _DENSE_OPS}))
            if len(kinds) == 1:
                out[var.op.name] = (kinds.pop(), f"graph: {ops}")
            elif kinds:
                out[var.op.name] = (None, f"graph: used by {ops}, ambiguous")
            else:
                out[var.op.name] = (None, "graph: not a kernel")
    return out


def _uses(tensor: Any) -> set[tuple[str, int]]:
    """(op type, input index) of every op reached from ``tensor`` through pass-through ops."""
    seen: set[int] = set()
    found: set[tuple[str, int]] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        for op in t.consumers():
            for i, inp in enumerate(op.inputs):
                if inp is not t:
                    continue
                if op.type in _PASSTHROUGH and i == 0:
                    if id(op) not in seen:
                        seen.add(id(op))
                        stack.extend(op.outputs)
                else:
                    found.add((op.type, i))
    return found
