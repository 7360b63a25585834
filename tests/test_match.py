"""``ckptbridge.match_tensorflow`` on torch models, piece by piece (the logits proof is tests/test_ports.py).

torch runs in a subprocess of its own: this file is collected beside the TensorFlow tests, and
torch imported after TensorFlow in one process segfaults (tests/torch_side.py).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from helpers import CLI_ENV

pytestmark = [pytest.mark.tf, pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torch and torchvision")]

_PROBE = textwrap.dedent(r"""
    import json, math, sys
    import numpy as np, torch, torchvision
    import ckptbridge
    from ckptbridge.ports import match

    out = {}

    def tf_same_max_pool(x, k, s):
        # TensorFlow's 'SAME' max pool, written out: pad with -inf (the odd pixel after), take each window's max.
        n, c, h, w = x.shape
        (t, b), (l, r) = match.same_pads(h, k, s), match.same_pads(w, k, s)
        p = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=-np.inf)
        oh, ow = math.ceil(h / s), math.ceil(w / s)
        return np.stack([np.stack([p[:, :, i * s:i * s + k, j * s:j * s + k].max(axis=(2, 3)) for j in range(ow)], -1)
                         for i in range(oh)], -2)

    pool = match.same_max_pool(3, 2)
    out["pool"] = {}
    for h, w in ((112, 112), (161, 161), (7, 8), (1, 2)):
        x = np.random.default_rng(h).standard_normal((1, 2, h, w)).astype(np.float32)
        got = pool(torch.from_numpy(x)).numpy()
        want = tf_same_max_pool(x, 3, 2)
        out["pool"][f"{h}x{w}"] = [list(got.shape), bool(got.shape == want.shape and (got == want).all())]
    out["pool_state"] = list(pool.state_dict())
    out["pads"] = {n: list(match.same_pads(n, 3, 2)) for n in (112, 161)}

    model = torchvision.models.resnet50(weights=None).eval()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    same = ckptbridge.match_tensorflow(model, "torchvision:resnet50")
    out["same_object"] = same is model
    out["keys_kept"] = {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    out["strides"] = {n: [list(getattr(model, n)[0].conv1.stride), list(getattr(model, n)[0].conv2.stride),
                          list(getattr(model, n)[0].downsample[0].stride)] for n in ("layer2", "layer3", "layer4")}
    out["layer1"] = [list(model.layer1[0].conv2.stride), list(model.layer2[1].conv2.stride)]
    out["maxpool"] = type(model.maxpool).__name__
    ckptbridge.match_tensorflow(model, "torchvision:resnet50")  # twice: nothing more
    out["twice"] = list(model.layer2[0].conv1.stride)
    with torch.no_grad():
        out["any_size"] = [list(model(torch.zeros(1, 3, s, t)).shape) for s, t in ((97, 131), (32, 32))]
    try:
        ckptbridge.match_tensorflow(model, "torchvision:resnet101")
    except ckptbridge.CkptBridgeError as e:
        out["other_map"] = str(e)
    try:
        ckptbridge.match_tensorflow(torchvision.models.resnet50(weights=None), sys.argv[1])
    except ckptbridge.CkptBridgeError as e:
        out["own_map"] = str(e)
    # A whole matched model pickles (torch.save) and comes back computing the same.
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False).eval()
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, 65, 65)).astype(np.float32))
    with torch.no_grad():
        out["pickled"] = [type(back.maxpool).__name__, bool(torch.equal(back(x), model(x)))]
    with torch.device("meta"):  # no weights needed: a map without caveats leaves the model as it is
        vgg = torchvision.models.vgg11(weights=None)
    out["no_caveats"] = ckptbridge.match_tensorflow(vgg, "torchvision:vgg11") is vgg
    print(json.dumps(out))
""")


def test_match_tensorflow_on_torch_models(tmp_path: Any) -> None:
    own = tmp_path / "own.toml"
    builtin = ckptbridge_map_text("torchvision:resnet50")
    own.write_text(builtin.replace('name = "torchvision:resnet50"', 'name = "my:resnet50"'))
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(own)], capture_output=True, text=True, env=CLI_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    # The SAME max pool is TensorFlow's at every size: (0, 1) at 112, (1, 1) at 161, and on tiny maps; no state.
    assert out["pads"] == {"112": [0, 1], "161": [1, 1]}
    assert out["pool"] == {"112x112": [[1, 2, 56, 56], True], "161x161": [[1, 2, 81, 81], True], "7x8": [[1, 2, 4, 4], True],
                           "1x2": [[1, 2, 1, 1], True]}
    assert out["pool_state"] == []
    # The resnet: the same model, the same keys, the strides moved (downsample keeps its own), pool1 SAME.
    assert out["same_object"] and out["keys_kept"]
    assert out["strides"] == {n: [[2, 2], [1, 1], [2, 2]] for n in ("layer2", "layer3", "layer4")}
    assert out["layer1"] == [[1, 1], [1, 1]]
    assert out["maxpool"] == "SameMaxPool2d"
    assert out["twice"] == [2, 2]
    assert out["any_size"] == [[1, 1000], [1, 1000]]
    assert "matched to port map torchvision:resnet50 already, not torchvision:resnet101" in out["other_map"]
    assert "port map my:resnet50 declares caveats (other, padding)" in out["own_map"] and "built-in maps only" in out["own_map"]
    assert out["no_caveats"]
    assert out["pickled"] == ["SameMaxPool2d", True]


def ckptbridge_map_text(name: str) -> str:
    import ckptbridge

    with open(ckptbridge.port_map(name).path) as f:
        return f.read()
