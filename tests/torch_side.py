"""The PyTorch side of the port maps (ckptbridge/ports/maps/*.toml), run in a process of its own.

    python tests/torch_side.py logits --map NAME --weights FILE(.safetensors|.npz) --input X.npy --out Y.npy
                                      [--tf-semantics] [--aux-out Z.npy]
    python tests/torch_side.py random --map NAME --out FILE.safetensors [--seed N]
    python tests/torch_side.py keys   --map NAME
    python tests/torch_side.py batch  --jobs JOBS.json

This module never imports TensorFlow nor ckptbridge: with torch 2.14.1, importing TensorFlow
first and torch second in one process segfaults, so the tests keep the two in separate
processes and run this file as a subprocess.

- ``build(map_name)``: the destination model, from the map's ``destination`` expression, in eval mode.
- ``patch_tf_semantics(model, map_name)``: applies the fixes of the map's caveats, so that the
  destination computes what the tf-slim net computes (the proof that a map is right):
    * ``padding``: every strided Conv2d / MaxPool2d / AvgPool2d that pads (or uses ceil_mode) is
      taken to mean TensorFlow's ``'SAME'``: its own padding is set to 0 and a forward pre-hook pads
      the input as TensorFlow does (``pad_total // 2`` before, the rest after; -inf for max pools);
    * ``pooling``: average pools exclude the padding (``count_include_pad=False``), for
      ``nn.AvgPool2d`` modules and for the ``F.avg_pool2d`` calls in the model's own Python modules
      (torchvision's, timm's: not torch's), while that model runs: other models are untouched.
  Apply it once per model.
  State-dict keys are unchanged, so weights load before or after patching.
- ``logits``: input is NHWC float32 as TensorFlow takes it (transposed here to NCHW); the output
  is the destination's logits (1000 classes).  ``--aux-out``: inception_v3's auxiliary logits
  (``AuxLogits`` applied to ``Mixed_6e``'s output, as in training).
- ``random``: a state_dict with random weights and non-trivial batch-norm running statistics; BN
  weights stay 1 because a tf-slim batch norm without ``scale`` cannot carry gamma.
- ``batch``: several of the above in one process (importing torch and building a model cost
  seconds each): JOBS.json is a list of objects ``{"cmd": "logits" | "random" | "keys", ...}`` with
  the options' names as keys (``map``, ``weights``, ``input``, ``out``, ``tf_semantics``,
  ``aux_out``, ``seed``; ``keys`` writes its JSON to ``out``).  Jobs run in order; a model is
  built once per map and patched when a job first asks for TensorFlow semantics (a later job
  without them gets a fresh one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MAPS_DIR = Path(__file__).resolve().parent.parent / "ckptbridge" / "ports" / "maps"


def load_map(map_name: str) -> dict[str, Any]:
    """The parsed TOML of a built-in map (``torchvision:vgg16`` -> ``torchvision__vgg16.toml``)."""
    path = MAPS_DIR / (map_name.replace(":", "__") + ".toml")
    with open(path, "rb") as f:
        return tomllib.load(f)


def build(map_name: str) -> nn.Module:
    """The map's destination model, built by its ``destination`` expression, in eval mode."""
    expr = load_map(map_name)["destination"]
    root = expr.split(".", 1)[0].split("(", 1)[0]
    namespace = {root: importlib.import_module(root)}
    if root == "torchvision":
        importlib.import_module("torchvision.models")
    model = eval(expr, namespace)  # the map's own expression, from a file of this repository
    model.eval()
    return model


# ---------------------------------------------------------------- TensorFlow semantics


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one spatial axis: (before, after)."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tf_same(module: nn.Module) -> None:
    """Make a strided conv or pool pad like TensorFlow's 'SAME' (asymmetric: the extra pixel after)."""
    k, s = _pair(module.kernel_size), _pair(module.stride)
    d = _pair(getattr(module, "dilation", 1))
    value = -math.inf if isinstance(module, nn.MaxPool2d) else 0.0
    if isinstance(module, nn.AvgPool2d):
        module.count_include_pad = False  # TensorFlow's average pools never count the padding
    module.padding = 0 if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) else (0, 0)
    if hasattr(module, "ceil_mode"):
        module.ceil_mode = False

    def pre_hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        top, bottom = _same_pads(x.shape[-2], k[0], s[0], d[0])
        left, right = _same_pads(x.shape[-1], k[1], s[1], d[1])
        return (F.pad(x, (left, right, top, bottom), value=value), *args[1:])

    module.register_forward_pre_hook(pre_hook)


def _patch_padding(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            strided = _pair(m.stride) != (1, 1)
            pads = _pair(m.padding) != (0, 0) if not isinstance(m.padding, str) else True
            if strided and (pads or getattr(m, "ceil_mode", False)):
                _tf_same(m)


class _Functional:
    """Stands in for ``torch.nn.functional`` in a model's Python module: ``avg_pool2d`` excludes
    the padding while a patched model runs (``active`` > 0 on this thread), and is torch's otherwise."""

    def __init__(self, functional: Any) -> None:
        self._functional = functional
        self._state = threading.local()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._functional, name)

    @property
    def active(self) -> int:
        return getattr(self._state, "active", 0)

    @active.setter
    def active(self, value: int) -> None:
        self._state.active = value

    def avg_pool2d(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.active:
            kwargs["count_include_pad"] = False
        return self._functional.avg_pool2d(*args, **kwargs)


def _patch_pooling(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.AvgPool2d):
            m.count_include_pad = False
    proxies: list[_Functional] = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        if name == "torch" or name.startswith("torch."):
            continue  # torch's own modules (nn.AvgPool2d is patched above), never replaced
        pymod = sys.modules[name]
        current = getattr(pymod, "F", None)
        if current is F:
            current = _Functional(F)
            pymod.F = current  # type: ignore[attr-defined]
        if isinstance(current, _Functional) and current not in proxies:
            proxies.append(current)

    def enter(*_: Any) -> None:
        for p in proxies:
            p.active += 1

    def leave(*_: Any) -> None:
        for p in proxies:
            p.active -= 1

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


_PATCHES = {"padding": _patch_padding, "pooling": _patch_pooling}


def patch_tf_semantics(model: nn.Module, map_name: str) -> nn.Module:
    """Apply the fixes of the map's caveats to ``model`` (in place; also returned)."""
    for caveat in load_map(map_name).get("caveats", []):
        kind = caveat["kind"]
        if kind not in _PATCHES:
            raise ValueError(f"{map_name}: no patch for a caveat of kind {kind!r}: {caveat['text']}")
        _PATCHES[kind](model)
    return model


# ---------------------------------------------------------------- weights


def load_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    with np.load(path, allow_pickle=False) as z:
        # ckptbridge's own members (__ckptbridge__: its metadata) are not the state_dict's: leave them out, as a user must.
        return {k: torch.from_numpy(np.array(z[k], order="C")) for k in z.files if not k.startswith("__ckptbridge")}  # keeps 0-d arrays 0-d


def random_state_dict(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights (He-scaled kernels), non-trivial BN statistics and beta, BN gamma left at 1."""
    g = torch.Generator().manual_seed(seed)
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in bn_weights or not t.is_floating_point():
            out[name] = t.clone()
        elif name.endswith("running_mean"):
            out[name] = torch.rand(t.shape, generator=g) * 0.6 - 0.3
        elif name.endswith("running_var"):
            out[name] = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        elif t.dim() >= 2:
            out[name] = torch.randn(t.shape, generator=g) * math.sqrt(2.0 / t[0].numel())
        else:
            out[name] = torch.randn(t.shape, generator=g) * 0.1
        out[name] = out[name].to(t.dtype).contiguous()
    return out


# ---------------------------------------------------------------- running


def _split(output: Any) -> Iterator[torch.Tensor]:
    """The logits (and the auxiliary logits when the model returns them) of a forward pass."""
    if isinstance(output, torch.Tensor):
        yield output
    else:  # torchvision's InceptionOutputs / GoogLeNetOutputs, timm's (logits, aux)
        yield from (t for t in output if t is not None)


def logits(model: nn.Module, x_nhwc: np.ndarray, aux: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits, auxiliary logits or None) for an NHWC batch."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()
    captured: dict[str, torch.Tensor] = {}
    handle = None
    if aux:
        handle = model.Mixed_6e.register_forward_hook(lambda _m, _i, o: captured.__setitem__("mixed_6e", o))
    with torch.no_grad():
        outs = list(_split(model(x)))
        aux_out = model.AuxLogits(captured["mixed_6e"]).numpy() if aux else None
    if handle is not None:
        handle.remove()
    return outs[0].numpy(), aux_out


def _keys_json(model: nn.Module) -> str:
    keys = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in model.state_dict().items()}
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()) + "\n}"  # one key a line


def run_job(job: dict[str, Any], models: dict[str, tuple[nn.Module, bool]]) -> None:
    """One job of ``batch`` (or of the single commands); ``models``: map -> (model, patched), reused."""
    cmd, map_name = job["cmd"], job["map"]
    want_tf = bool(job.get("tf_semantics", False))
    cached = models.get(map_name)
    if cached is None or (cmd == "logits" and cached[1] and not want_tf):
        cached = models[map_name] = (build(map_name), False)
    model, patched = cached
    if cmd == "keys":
        text = _keys_json(model)
        if job.get("out"):
            Path(job["out"]).write_text(text + "\n")
        else:
            print(text)
    elif cmd == "random":
        from safetensors.torch import save_file

        save_file(random_state_dict(model, int(job.get("seed", 0))), job["out"])
    elif cmd == "logits":
        model.load_state_dict(load_weights(job["weights"]), strict=True)
        if want_tf and not patched:
            patch_tf_semantics(model, map_name)
            models[map_name] = (model, True)
        y, aux = logits(model, np.load(job["input"]), aux=bool(job.get("aux_out")))
        np.save(job["out"], y)
        if job.get("aux_out"):
            np.save(job["aux_out"], aux)
    else:
        raise ValueError(f"unknown job {cmd!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="torch_side.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits", help="run the destination on an NHWC batch")
    lg.add_argument("--map", required=True)
    lg.add_argument("--weights", required=True, help=".safetensors or .npz with the destination's state_dict")
    lg.add_argument("--input", required=True, help="NHWC float32 .npy")
    lg.add_argument("--out", required=True)
    lg.add_argument("--tf-semantics", action="store_true", help="apply the map's caveat fixes first")
    lg.add_argument("--aux-out", help="also write the auxiliary logits (inception_v3)")
    rd = sub.add_parser("random", help="write a random destination state_dict")
    rd.add_argument("--map", required=True)
    rd.add_argument("--out", required=True)
    rd.add_argument("--seed", type=int, default=0)
    ks = sub.add_parser("keys", help="print the destination's state_dict keys, shapes and dtypes as JSON")
    ks.add_argument("--map", required=True)
    bt = sub.add_parser("batch", help="run a JSON list of jobs in this one process (see the module's doc)")
    bt.add_argument("--jobs", required=True, help="a JSON file: a list of {\"cmd\": ..., option: value, ...}")
    args = p.parse_args(argv)

    if args.cmd == "batch":
        with open(args.jobs) as f:
            jobs = json.load(f)
        if not isinstance(jobs, list) or not all(isinstance(j, dict) and "cmd" in j and "map" in j for j in jobs):
            raise SystemExit(f"{args.jobs}: expected a JSON list of objects with 'cmd' and 'map'")
        models: dict[str, tuple[nn.Module, bool]] = {}
        for job in jobs:
            run_job(job, models)
        return
    job = {k: v for k, v in vars(args).items() if v is not None}
    run_job(job, {})


if __name__ == "__main__":
    main()
