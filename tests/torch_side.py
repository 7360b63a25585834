"""The PyTorch side of the port maps (ckptbridge/ports/maps/*.toml), run in a process of its own.

    python tests/torch_side.py logits --map NAME --weights FILE(.safetensors|.npz) --input X.npy --out Y.npy
                                      [--tf-semantics] [--aux-out Z.npy]
    python tests/torch_side.py random --map NAME --out FILE.safetensors [--seed N]
    python tests/torch_side.py keys   --map NAME
    python tests/torch_side.py strict --map NAME --specs SPECS.json --out NAMES.json
    python tests/torch_side.py batch  --jobs JOBS.json

This module never imports TensorFlow: with torch 2.14.1, importing TensorFlow first and torch
second in one process segfaults, so the tests keep the two in separate processes and run this
file as a subprocess.  It imports ckptbridge (which imports neither) only for
``ckptbridge.match_tensorflow``, the public fix of the maps' caveats.

- ``build(map_name)``: the destination model, from the map's ``destination`` expression, in eval mode.
- ``patch_tf_semantics(model, map_name)``: ``ckptbridge.match_tensorflow(model, map_name)``, so that
  the destination computes what the tf-slim net computes (the proof that a map is right).
  State-dict keys are unchanged, so weights load before or after.
- ``logits``: input is NHWC float32 as TensorFlow takes it (transposed here to NCHW); the output
  is the destination's logits (1000 classes).  ``--aux-out``: inception_v3's auxiliary logits
  (``AuxLogits`` applied to ``Mixed_6e``'s output, as in training).
- ``strict``: ``load_state_dict(strict=True)`` of tensors with the names, dtypes and shapes of a JSON
  file (name -> [dtype, shape]), model and tensors on the meta device: a map's output accepted
  (names and shapes) without making its weights.
- ``random``: a state_dict with random weights and non-trivial batch-norm running statistics; BN
  weights stay 1 where the slim net's batch norm has no ``scale`` (it cannot carry gamma), and are
  random where it has (resnet).
- ``batch``: several of the above in one process (importing torch and building a model cost
  seconds each): JOBS.json is a list of objects ``{"cmd": "logits" | "random" | "keys", ...}`` with
  the options' names as keys (``map``, ``weights``, ``input``, ``out``, ``tf_semantics``,
  ``aux_out``, ``feature`` (a module whose output is saved, NHWC, to ``feature_out``), ``seed``,
  ``specs``; ``keys`` writes its JSON to ``out``).  Jobs run in order; a model is
  built once per map and patched when a job first asks for TensorFlow semantics (a later job
  without them gets a fresh one).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
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


def patch_tf_semantics(model: nn.Module, map_name: str) -> nn.Module:
    """The map's caveats fixed, as a user does it: ``ckptbridge.match_tensorflow`` (the model it returns)."""
    import ckptbridge

    return ckptbridge.match_tensorflow(model, map_name)


# ---------------------------------------------------------------- weights


def load_weights(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    with np.load(path, allow_pickle=False) as z:
        # ckptbridge's own members (__ckptbridge__: its metadata) are not the state_dict's: leave them out, as a user must.
        return {k: torch.from_numpy(np.array(z[k], order="C")) for k in z.files if not k.startswith("__ckptbridge")}  # keeps 0-d arrays 0-d


def carries_gamma(map_name: str) -> bool:
    """Whether the map's slim net has batch-norm gamma (resnet: ``scale=True``), so a random gamma can be carried."""
    return any(key.endswith("BatchNorm/gamma") for tpl in load_map(map_name).get("templates", {}).values() for key in tpl)


def random_state_dict(model: nn.Module, seed: int, gamma: bool = False) -> dict[str, torch.Tensor]:
    """Random weights (He-scaled kernels), non-trivial BN statistics and beta; BN gamma left at 1 unless ``gamma``."""
    g = torch.Generator().manual_seed(seed)
    bn_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name in bn_weights and gamma:
            out[name] = torch.rand(t.shape, generator=g) * 1.0 + 0.5
        elif name in bn_weights or not t.is_floating_point():
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


def logits(model: nn.Module, x_nhwc: np.ndarray, aux: bool = False,
           feature: str | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(logits, auxiliary logits or None, the output of module ``feature`` as NHWC or None) for an NHWC batch."""
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()
    captured: dict[str, torch.Tensor] = {}
    handles = []
    if aux:
        handles.append(model.Mixed_6e.register_forward_hook(lambda _m, _i, o: captured.__setitem__("mixed_6e", o)))
    if feature:
        handles.append(model.get_submodule(feature).register_forward_hook(lambda _m, _i, o: captured.__setitem__("feature", o)))
    with torch.no_grad():
        outs = list(_split(model(x)))
        aux_out = model.AuxLogits(captured["mixed_6e"]).numpy() if aux else None
    for handle in handles:
        handle.remove()
    features = captured["feature"].permute(0, 2, 3, 1).contiguous().numpy() if feature else None
    return outs[0].numpy(), aux_out, features


def strict_load(model: nn.Module, specs_path: str) -> list[str]:
    """Load a state_dict (meta tensors) with the names, dtypes and shapes of ``specs_path`` (JSON: name -> [dtype, shape]),
    ``strict=True``: what torch accepts of an archive with exactly those tensors.  Returns the names loaded."""
    with open(specs_path) as f:
        specs = json.load(f)
    state = {n: torch.zeros(shape, dtype=getattr(torch, dtype), device="meta") for n, (dtype, shape) in specs.items()}
    model.load_state_dict(state, strict=True)
    return sorted(state)


def _keys_json(model: nn.Module) -> str:
    keys = {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for k, t in model.state_dict().items()}
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items()) + "\n}"  # one key a line


def run_job(job: dict[str, Any], models: dict[str, tuple[nn.Module, bool]]) -> None:
    """One job of ``batch`` (or of the single commands); ``models``: map -> (model, patched), reused."""
    cmd, map_name = job["cmd"], job["map"]
    if cmd == "strict":  # on the meta device: the names and shapes are checked, no weight is made or copied
        with torch.device("meta"):
            loaded = strict_load(build(map_name), job["specs"])
        Path(job["out"]).write_text(json.dumps(loaded) + "\n")
        return
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

        save_file(random_state_dict(model, int(job.get("seed", 0)), gamma=carries_gamma(map_name)), job["out"])
    elif cmd == "logits":
        model.load_state_dict(load_weights(job["weights"]), strict=True)
        if want_tf and not patched:
            patch_tf_semantics(model, map_name)
            models[map_name] = (model, True)
        y, aux, features = logits(model, np.load(job["input"]), aux=bool(job.get("aux_out")), feature=job.get("feature"))
        np.save(job["out"], y)
        if job.get("aux_out"):
            np.save(job["aux_out"], aux)
        if job.get("feature"):
            np.save(job["feature_out"], features)
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
    st = sub.add_parser("strict", help="load zeros of the given names, dtypes and shapes with strict=True")
    st.add_argument("--map", required=True)
    st.add_argument("--specs", required=True, help="JSON: name -> [dtype, shape]")
    st.add_argument("--out", required=True)
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
