"""The proof of the port maps to PyTorch: a tf-slim net and the destination model a map names compute the same thing.

For every built-in map whose destination is a PyTorch model (torchvision, timm; the Keras maps
are proven in tests/test_keras_ports.py):

1. TensorFlow builds the tf-slim net (``is_training=False``) with random weights, biases,
   batch-norm betas and moving statistics away from 0 and 1, saves it, and computes its
   logits (and inception_v3's auxiliary logits) on a fixed batch of 2 images;
2. ``ckptbridge export --to MAP`` writes the destination's ``state_dict``;
3. PyTorch (in a process of its own: tests/torch_side.py, never beside TensorFlow) builds the
   destination with its own constructor, loads it with ``strict=True`` and runs the batch:
   without caveats the logits agree within 1e-5 (relative to the largest); with caveats they
   differ as shipped (the caveat is real) and agree once matched to TensorFlow's semantics
   (``ckptbridge.match_tensorflow``); the resnets also at 321 px (their SAME pool pads by the
   input's size) and on their last feature map (global pooling hides a misplaced tensor);
4. the other way: a random ``state_dict`` imported with ``--from MAP --model NET`` and restored
   by TensorFlow's Saver in a fresh slim graph computes the matched destination's logits;
5. export then import gives the checkpoint back bit for bit, but for TensorFlow's background
   class, which a 1000-class destination cannot carry: it comes back as zeros, and nothing else
   changes;
6. what cannot be ported is refused with one line and nothing written;
7. the maps whose logits only --slow proves (resnet101/152, vgg11) load strict in every run.

One torch subprocess computes every destination-side result (``torch_side.py batch``), started
once the exports are written; the tests that need none of its results (export, round trip,
refusals) come first in this file and run while it works.  Each slim net is built once and
shared by the maps that use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_slim")
pytest.importorskip("tf_keras")
pytest.importorskip("safetensors")

import ckptbridge  # noqa: E402
from ckptbridge import PortMap  # noqa: E402

from helpers import assert_one_line_error, cli, leftovers, same, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.tf

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_SIDE = os.path.join(HERE, "torch_side.py")


def _torch_destination(pmap: PortMap) -> bool:
    """Whether torch_side.py builds the map's destination (a torchvision or timm model)."""
    return pmap.destination.split("(", 1)[0].split(".", 1)[0] in ("torchvision", "timm")


#: the built-in maps to PyTorch models, proven here (Keras destinations: tests/test_keras_ports.py)
MAPS: dict[str, PortMap] = {n: m for n, m in ckptbridge.port_maps().items() if _torch_destination(m)}
MAP_NAMES = sorted(MAPS)
#: Proofs that scripts/test leaves to --slow (the suite's time budget): vgg19 whole (vgg16 proves the
#: same layer kinds), vgg16's 528 MB round trip and reverse import (the inception nets prove both), and
#: timm:inception_v3 whole (about a minute): its rules are torchvision:inception_v3's, line for line;
#: only the destination model differs.
#: vgg11 (vgg_a) whole: vgg16 proves its layer kinds; resnet101/152 whole: their templates are resnet50's, only the
#: repeat counts differ (all three load strict in the fast suite: test_new_maps_load_strict).
SLOW_MAPS = {"torchvision:vgg19", "timm:inception_v3", "torchvision:vgg11", "torchvision:resnet101", "torchvision:resnet152"}
SLOW_BOTH_WAYS = {"torchvision:vgg16", "torchvision:vgg19", "timm:inception_v3", "torchvision:vgg11", "torchvision:resnet101",
                  "torchvision:resnet152"}


def _params(slow: set[str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in MAP_NAMES]
BATCH = 2
AGREE = 1e-5     # logits that must agree: max|a - b| / max|b|
DIFFER = 1e-3    # logits a caveat says differ: at least this much
FORMATS_MAP = "torchvision:googlenet"  # the map whose .npz and .h5 exports are checked too: 25 MiB, not VGG's 528 MiB

#: tf-slim net -> (module, function, arg scope), and a seed of its own
SLIM = {
    "vgg_a": ("tf_slim.nets.vgg", "vgg_a", "vgg_arg_scope"),
    "vgg_16": ("tf_slim.nets.vgg", "vgg_16", "vgg_arg_scope"),
    "vgg_19": ("tf_slim.nets.vgg", "vgg_19", "vgg_arg_scope"),
    "inception_v1": ("tf_slim.nets.inception", "inception_v1", "inception_v1_arg_scope"),
    "inception_v3": ("tf_slim.nets.inception", "inception_v3", "inception_v3_arg_scope"),
    **{f"resnet_v1_{d}": ("tf_slim.nets.resnet_v1", f"resnet_v1_{d}", "resnet_arg_scope") for d in (50, 101, 152)},
}
SEEDS = {"vgg_a": 11, "vgg_16": 16, "vgg_19": 19, "inception_v1": 1, "inception_v3": 3, "resnet_v1_50": 50, "resnet_v1_101": 101,
         "resnet_v1_152": 152}
#: nets whose SAME pools pad by the input's size: also run at an odd size, outputs keyed "logits@321"
ODD_SIZE = 321
ANY_SIZE = {"resnet_v1_50", "resnet_v1_101", "resnet_v1_152"}
#: the last feature map, compared too (global average pooling hides a misplaced tensor in the logits):
#: slim end point -> the destination module whose output it is
FEATURES = {f"resnet_v1_{d}": (f"resnet_v1_{d}/block4", "layer4") for d in (50, 101, 152)}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|: how far ``a`` is from ``b``, on ``b``'s scale."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def has_background(pmap: PortMap) -> bool:
    return pmap.source_classes == pmap.dest_classes + 1


def destination_classes(pmap: PortMap, slim_logits: np.ndarray) -> np.ndarray:
    """Slim's logits as the destination's classes: TensorFlow's background class (index 0) dropped."""
    return slim_logits[:, 1:] if has_background(pmap) else slim_logits


def key(map_name: str) -> str:
    return map_name.replace(":", "__")


def class_tensors(pmap: PortMap) -> list[str]:
    """The slim tensors whose last axis is the class axis (logits, auxiliary logits)."""
    return sorted(r.source for r in pmap.rules if r.classes)


# --------------------------------------------------------------------------- the tf-slim side


def _session_config() -> Any:
    import tensorflow as tf

    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True  # each graph runs once or twice
    return config


def _random_value(name: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """He-scaled kernels, small biases and betas, moving statistics and gammas away from 0 and 1."""
    if name.endswith("gamma"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("moving_mean"):
        return rng.uniform(-0.3, 0.3, shape).astype(np.float32)
    if name.endswith("moving_variance"):
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if len(shape) >= 2:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.1)


@dataclasses.dataclass
class SlimGraph:
    """One tf-slim net in a graph of its own, with a session: its logits for a batch, any checkpoint restored."""

    net: str
    graph: Any
    session: Any
    images: Any
    outputs: dict[str, Any]  # "logits", and "aux" for inception_v3
    saver: Any

    @classmethod
    def build(cls, net: str, image_size: int, num_classes: int) -> SlimGraph:
        import tensorflow as tf

        from ckptbridge.tf.compat import import_slim

        slim = import_slim()
        module, function, arg_scope = SLIM[net]
        mod = importlib.import_module(module)
        graph = tf.Graph()
        with graph.as_default():
            side = None if net in ANY_SIZE else image_size
            images = tf.compat.v1.placeholder(tf.float32, [None, side, side, 3], name="images")
            with slim.arg_scope(getattr(mod, arg_scope)()):
                logits, end_points = getattr(mod, function)(images, num_classes=num_classes, is_training=False)
            if len(logits.shape) == 4:  # spatial_squeeze cannot squeeze the unknown spatial axes of an any-size input
                logits = tf.squeeze(logits, [1, 2])
            outputs = {"logits": logits}
            if "AuxLogits" in end_points:
                outputs["aux"] = end_points["AuxLogits"]
            if net in FEATURES:
                outputs["features"] = end_points[FEATURES[net][0]]
            saver = tf.compat.v1.train.Saver()
            session = tf.compat.v1.Session(graph=graph, config=_session_config())
        return cls(net, graph, session, images, outputs, saver)

    def randomize(self, seed: int) -> None:
        import tensorflow as tf

        rng = np.random.default_rng(seed)
        with self.graph.as_default():
            variables = tf.compat.v1.global_variables()
            # One run: every initializer fed its random value instead of computing its own.
            feeds = {v.initial_value: _random_value(v.op.name, v.shape.as_list(), rng) for v in variables}
            self.session.run(tf.compat.v1.global_variables_initializer(), feeds)

    def save(self, prefix: str) -> str:
        with self.graph.as_default():  # the Saver works in graph mode only inside its graph
            return self.saver.save(self.session, prefix, write_meta_graph=False)

    def restore(self, prefix: str) -> None:
        with self.graph.as_default():
            self.saver.restore(self.session, prefix)  # every variable of the graph must be in the checkpoint

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self.session.run(self.outputs, {self.images: x})

    def run_all(self, xs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs on each batch of ``xs`` (suffix -> batch), keyed ``what + suffix``."""
        return {what + suffix: y for suffix, x in xs.items() for what, y in self.run(x).items()}

    def close(self) -> None:
        self.session.close()


@dataclasses.dataclass
class SlimNet:
    """A saved tf-slim net: its checkpoint, the batch and what the net computes on it."""

    net: str
    prefix: str
    x: np.ndarray
    x_path: str
    out: dict[str, np.ndarray]  # "logits", "aux", "features", and "logits@321" and the like for the other batches
    others: dict[str, tuple[np.ndarray, str]] = dataclasses.field(default_factory=dict)  # suffix ("@321") -> (batch, its .npy)

    @property
    def batches(self) -> dict[str, np.ndarray]:
        return {"": self.x, **{suffix: x for suffix, (x, _) in self.others.items()}}


class SlimNets:
    """Each tf-slim net built, randomized and saved once, on first use; a fresh graph per net for restores."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._nets: dict[str, SlimNet] = {}
        self._restore: dict[str, SlimGraph] = {}

    @staticmethod
    def _shape(net: str) -> tuple[int, int]:
        pmap = next(m for m in MAPS.values() if m.net == net)
        return pmap.image_size, pmap.source_classes

    def get(self, net: str) -> SlimNet:
        if net not in self._nets:
            size, classes = self._shape(net)
            d = os.path.join(self.root, net)
            os.makedirs(d)
            g = SlimGraph.build(net, size, classes)
            rng = np.random.default_rng(100 + SEEDS[net])
            xs = {"": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)}
            if net in ANY_SIZE:
                xs[f"@{ODD_SIZE}"] = rng.uniform(-1, 1, (BATCH, ODD_SIZE, ODD_SIZE, 3)).astype(np.float32)
            try:
                g.randomize(SEEDS[net])
                out = g.run_all(xs)
                prefix = g.save(os.path.join(d, "model.ckpt"))
            finally:
                g.close()
            paths = {suffix: os.path.join(d, f"x{suffix}.npy") for suffix in xs}
            for suffix, x in xs.items():
                np.save(paths[suffix], x)
            others = {suffix: (x, paths[suffix]) for suffix, x in xs.items() if suffix}
            self._nets[net] = SlimNet(net, prefix, xs[""], paths[""], out, others)
        return self._nets[net]

    def logits_of(self, net: str, prefix: str) -> dict[str, np.ndarray]:
        """What the net computes on its batch with the weights of checkpoint ``prefix``, restored by TensorFlow's Saver."""
        if net not in self._restore:
            size, classes = self._shape(net)
            self._restore[net] = SlimGraph.build(net, size, classes)
        g = self._restore[net]
        g.restore(prefix)
        return g.run_all(self.get(net).batches)

    def close(self) -> None:
        for g in self._restore.values():
            g.close()


@pytest.fixture(scope="module")
def slim(module_tmp: Any) -> Any:
    nets = SlimNets(str(module_tmp("slim")))
    yield nets
    nets.close()


# --------------------------------------------------------------------------- the destination side


@dataclasses.dataclass
class Port:
    """One map's export, and (once the torch process is done) what the destination computes."""

    name: str
    pmap: PortMap
    slim: SlimNet
    exported: str                           # the CLI's .safetensors
    export_run: subprocess.CompletedProcess[str]
    random_weights: str                     # a random state_dict written by torch_side
    jobs: dict[str, dict[str, Any]]         # "shipped", "patched", "random", "npz": torch_side logits jobs
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # "npz", "h5": the same export in those formats
    owner: Any = None

    def _outputs(self, tag: str) -> dict[str, np.ndarray]:
        """What the torch jobs of ``tag`` computed, keyed as ``SlimNet.out``: ``tag`` on the default batch,
        ``tag@321`` on the odd-sized one."""
        self.owner.wait()
        got = {}
        for job_tag, job in self.jobs.items():
            if job_tag.split("@")[0] != tag:
                continue
            suffix = job_tag[len(tag):]
            got["logits" + suffix] = np.load(job["out"])
            if "aux_out" in job:
                got["aux" + suffix] = np.load(job["aux_out"])
            if "feature_out" in job:
                got["features" + suffix] = np.load(job["feature_out"])
        return got

    @property
    def shipped(self) -> dict[str, np.ndarray]:
        """The destination as shipped, on the exported weights."""
        return self._outputs("shipped")

    @property
    def patched(self) -> dict[str, np.ndarray]:
        """The destination patched to TensorFlow's semantics (as shipped, for a map without caveats)."""
        return self._outputs("patched")

    @property
    def random_patched(self) -> dict[str, np.ndarray]:
        """The patched destination on ``random_weights``."""
        return self._outputs("random")

    @property
    def npz_patched(self) -> dict[str, np.ndarray]:
        return self._outputs("npz")


class Ports:
    """Every map exported (the CLI); then all maps' destination-side jobs in one torch process, in the background.

    TensorFlow work (round trips, refusals) goes on while torch runs; a test that needs
    torch's results waits for it (``Port.shipped`` and the like).
    """

    def __init__(self, root: str, slim: SlimNets, wanted: list[str]) -> None:
        self.root = root
        self.slim = slim
        self.wanted = wanted  # the maps the selected tests ask for (scripts/test leaves the slow ones out)
        self._ports: dict[str, Port] | None = None
        self._failed: BaseException | None = None
        self._torch: subprocess.Popen[bytes] | None = None
        self._torch_done = False

    def _once(self, step: Any) -> Any:
        if self._failed is not None:
            pytest.fail(f"the ports fixture failed before: {self._failed!r}", pytrace=False)
        try:
            return step()
        except BaseException as e:  # once: every test after this one fails at once instead of running it all again
            self._failed = e
            raise

    def __getitem__(self, name: str) -> Port:
        if self._ports is None:
            self._ports = self._once(self._export)
        assert self._ports is not None
        return self._ports[name]

    def _export(self) -> dict[str, Port]:
        jobs: list[dict[str, Any]] = []
        ports: dict[str, Port] = {}
        for name in self.wanted:
            pmap = MAPS[name]
            s = self.slim.get(pmap.net)
            out = os.path.join(self.root, key(name) + ".safetensors")
            r = cli("export", s.prefix, out, "--to", name, "--no-fsync")
            assert r.returncode == 0, f"export --to {name} failed: {r.stderr[-2000:]}"

            mine: dict[str, dict[str, Any]] = {}

            def logits_job(weights: str, tag: str, tf_semantics: bool, name: str = name, s: SlimNet = s,
                           mine: dict[str, dict[str, Any]] = mine) -> dict[str, Any]:
                """The logits job on the default batch (returned), and one on each other batch (tagged ``tag@321``)."""
                first = None
                for suffix, x_path in (("", s.x_path), *((sfx, p) for sfx, (_, p) in s.others.items())):
                    base = os.path.join(self.root, f"{key(name)}.{tag}{suffix}")
                    job = {"cmd": "logits", "map": name, "weights": weights, "input": x_path, "out": base + ".logits.npy",
                           "tf_semantics": tf_semantics}
                    if "aux" in s.out:
                        job["aux_out"] = base + ".aux.npy"
                    if s.net in FEATURES:
                        job["feature"], job["feature_out"] = FEATURES[s.net][1], base + ".features.npy"
                    jobs.append(job)
                    if suffix:
                        mine[tag + suffix] = job
                    first = first or job
                assert first is not None
                return first

            caveats = bool(pmap.caveats)
            random_weights = os.path.join(self.root, key(name) + ".random.safetensors")
            # Order matters to torch_side: a map's model is patched by the first job that asks for it.
            mine["shipped"] = logits_job(out, "shipped", False)
            if caveats:
                mine["patched"] = logits_job(out, "patched", True)
            else:
                mine.update({"patched" + k[len("shipped"):]: job for k, job in list(mine.items()) if k.startswith("shipped")})
            jobs.append({"cmd": "random", "map": name, "out": random_weights, "seed": 1000 + MAP_NAMES.index(name)})
            mine["random"] = logits_job(random_weights, "random", caveats)
            extra = {}
            if name == FORMATS_MAP:
                # The same state_dict as .npz and .h5 (the API this time); torch_side loads the .npz too.
                for suffix in ("npz", "h5"):
                    extra[suffix] = os.path.join(self.root, f"{key(name)}.{suffix}")
                    ckptbridge.export(s.prefix, extra[suffix], ckptbridge.Port(name), fsync=False)
                mine["npz"] = logits_job(extra["npz"], "npz", caveats)
            ports[name] = Port(name, pmap, s, out, r, random_weights, mine, extra, self)
        path = os.path.join(self.root, "jobs.json")
        with open(path, "w") as f:
            json.dump(jobs, f, indent=1)
        # torch never in this process (TensorFlow is here): torch_side.py in its own, one for every map.
        with open(os.path.join(self.root, "torch.stderr"), "wb") as err:
            self._torch = subprocess.Popen([sys.executable, TORCH_SIDE, "batch", "--jobs", path], stdout=subprocess.DEVNULL, stderr=err,
                                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return ports

    def wait(self) -> None:
        """Wait for the torch process; it must have succeeded."""
        if self._torch_done:
            return

        def step() -> None:
            assert self._torch is not None
            rc = self._torch.wait(timeout=900)
            with open(os.path.join(self.root, "torch.stderr"), "rb") as f:
                err = f.read().decode("utf-8", "replace")
            assert rc == 0, f"torch_side.py batch failed (exit {rc}):\n{err[-4000:]}"
            self._torch_done = True

        self._once(step)

    def close(self) -> None:
        if self._torch is not None and self._torch.poll() is None:  # the run was cut short: end the process we started
            self._torch.kill()
            self._torch.wait()


@pytest.fixture(scope="module")
def ports(request: pytest.FixtureRequest, slim: SlimNets, module_tmp: Any) -> Any:
    here = [item for item in request.session.items if item.module is request.module]
    asked = {item.callspec.params.get("name") for item in here if hasattr(item, "callspec")}
    wanted = [n for n in MAP_NAMES if n in asked or (n == FORMATS_MAP)] or [FORMATS_MAP]
    p = Ports(str(module_tmp("ports")), slim, wanted)
    yield p
    p.close()


# --------------------------------------------------------------------------- the reference layouts


def expected_state_dict(pmap: PortMap, tensors: Mapping[str, np.ndarray], *, ema: bool = False) -> dict[str, np.ndarray]:
    """The destination tensors the map's rules make of slim ``tensors``, computed here with NumPy alone."""
    out = {}
    for r in pmap.rules:
        name = r.source + "/ExponentialMovingAverage" if ema and r.source + "/ExponentialMovingAverage" in tensors else r.source
        a = tensors[name]
        if r.classes and has_background(pmap):
            a = a[..., 1:]
        if r.transform == "conv":
            a = np.transpose(a, (3, 2, 0, 1))                       # HWIO -> OIHW
        elif r.transform == "fc_as_conv":
            a = np.transpose(a, (3, 2, 0, 1)).reshape(a.shape[3], -1)  # [H, W, in, out] -> [out, in*H*W], (C, H, W) order
        else:
            assert r.transform == "none", r.transform
        out[r.dest] = np.ascontiguousarray(a)
    return out


def read_all(path: str) -> dict[str, np.ndarray]:
    with ckptbridge.read(path) as r:
        return {n: r[n] for n in r}


# --------------------------------------------------------------------------- 2. export


def test_every_builtin_map_is_proven() -> None:
    """A built-in map is proven here (PyTorch) or in tests/test_keras_ports.py (Keras): none goes unproven."""
    assert len(MAPS) >= 5, sorted(MAPS)
    unproven = [n for n, m in ckptbridge.port_maps().items() if n not in MAPS and not m.destination.startswith("keras.")]
    assert unproven == [], f"no test computes these maps' destinations: {unproven}"


#: maps whose logits are proven in --slow only; their output must load strict in every run
STRICT_ONLY = ["torchvision:resnet101", "torchvision:resnet152", "torchvision:vgg11"]


def test_slow_maps_load_strict(tmp_path: Any) -> None:
    """What export writes for the slim net's own variables loads into the destination with strict=True.

    The slim graph is built (its variables' names, shapes and dtypes, no weights), the map is planned on
    arrays of zeros of those specs, and torch (its own process) loads zeros of the planned specs strictly.
    """
    import tensorflow as tf

    from ckptbridge._source import ArraySource
    from ckptbridge.ports import plan_export

    specs: dict[str, dict[str, Any]] = {}
    for name in STRICT_ONLY:
        pmap = MAPS[name]
        g = SlimGraph.build(pmap.net, pmap.image_size, pmap.source_classes)
        with g.graph.as_default():
            tf.compat.v1.train.get_or_create_global_step()  # a trained checkpoint has it; the map skips it
            variables = {v.op.name: np.zeros(v.shape.as_list(), v.dtype.base_dtype.as_numpy_dtype) for v in tf.compat.v1.global_variables()}
        g.close()
        ported = plan_export(ArraySource(variables), pmap)
        assert ported.plan.dropped == {"global_step": f"skipped by port map {name}"}
        specs[name] = {n: [sp.dtype, list(sp.shape)] for n, sp in ported.source.specs().items()}
        assert len(specs[name]) == len(pmap.rules) + len(pmap.added)
    jobs = []
    for name in STRICT_ONLY:
        spec_path = tmp_path / f"{key(name)}.specs.json"
        spec_path.write_text(json.dumps(specs[name]))
        jobs.append({"cmd": "strict", "map": name, "specs": str(spec_path), "out": str(tmp_path / f"{key(name)}.loaded.json")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    r = subprocess.run([sys.executable, TORCH_SIDE, "batch", "--jobs", str(tmp_path / "jobs.json")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for job in jobs:
        assert json.loads(open(job["out"]).read()) == sorted(specs[job["map"]]), job["map"]
    units = {"torchvision:resnet101": 3 + 4 + 23 + 3, "torchvision:resnet152": 3 + 8 + 36 + 3}
    for name, n in units.items():
        assert sum(1 for k in specs[name] if k.endswith(".conv3.weight")) == n
        assert specs[name]["layer1.0.bn1.num_batches_tracked"] == ["int64", []]


@pytest.mark.parametrize("name", _params(SLOW_MAPS))
def test_export_writes_the_destination_state_dict(ports: Ports, name: str) -> None:
    """The CLI export: one line per caveat, the destination's names and layouts, bit-exact values."""
    port = ports[name]
    pmap = port.pmap
    r = port.export_run
    assert "Traceback" not in r.stderr
    caveat_lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"ckptbridge: caveat of port map {name}: ")]
    assert len(caveat_lines) == len(pmap.caveats), r.stderr
    assert f"wrote {len(pmap.rules) + len(pmap.added)} tensors" in r.stderr + r.stdout
    assert leftovers(os.path.dirname(port.exported)) == []
    got = read_all(port.exported)
    want = expected_state_dict(pmap, read_all(port.slim.prefix))
    assert sorted(got) == sorted([*want, *(a.dest for a in pmap.added)])
    for n, w in want.items():
        assert same(got[n], w), f"{n}: {got[n].dtype}{list(got[n].shape)} is not the map's layout of its slim tensor"
    for a in pmap.added:
        assert a.fill in (0.0, 1.0)
        assert got[a.dest].dtype == (np.int64 if a.dtype == "int64" else np.float32), (a.dest, got[a.dest].dtype)
        assert np.all(got[a.dest] == a.fill), a.dest


# --------------------------------------------------------------------------- 5. round trip


@pytest.mark.parametrize("name", _params(SLOW_BOTH_WAYS))
def test_round_trip_loses_only_the_background_class(ports: Ports, name: str, tmp_path: Any) -> None:
    """export --to, then import --from --model: the original checkpoint, but the background class comes back as zeros."""
    port = ports[name]
    pmap = port.pmap
    prefix = str(tmp_path / "back" / "model.ckpt")
    ckptbridge.rebuild(port.exported, prefix, ckptbridge.Port(name), graph=ckptbridge.Graph(pmap.net), fsync=False)
    r = cli("diff", port.slim.prefix, prefix)
    if not has_background(pmap):  # nothing lost, nothing added: diff says so, and every tensor has the same dtype and bytes
        with ckptbridge.read(port.slim.prefix) as original, ckptbridge.read(prefix) as back:
            assert r.returncode == 0 and r.stdout.strip() == f"identical: {len(original)} tensors", r.stdout + r.stderr
            assert sorted(original) == sorted(back)
            for n in original:
                assert same(original[n], back[n]), n
        return
    a, b = read_all(port.slim.prefix), read_all(prefix)
    assert sorted(a) == sorted(b)
    classes = class_tensors(pmap)
    assert r.returncode == 1, r.stdout + r.stderr
    differ = sorted(ln.split(": ")[1] for ln in r.stdout.splitlines() if ln.startswith("values differ: "))
    assert differ == classes, r.stdout
    assert r.stdout.splitlines()[-1] == f"different: 0 only in A, 0 only in B, 0 shape/dtype, {len(classes)} values ({len(a)} compared)"
    for n in a:
        if n not in classes:
            assert same(a[n], b[n]), n
            continue
        # Everything but index 0 of the class axis is bit-exact; index 0 was the background class, now zeros.
        assert same(a[n][..., 1:], b[n][..., 1:]), n
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape
        assert np.all(b[n][..., 0] == 0) and np.all(a[n][..., 0] != 0), n


# --------------------------------------------------------------------------- 6. what cannot be ported


def test_export_of_another_net_is_refused(slim: SlimNets, tmp_path: Any) -> None:
    """An inception_v1 checkpoint --to torchvision:inception_v3: one line naming what the map does not use
    and what it misses, nothing written."""
    out = tmp_path / "inception_v3.safetensors"
    r = cli("export", slim.get("inception_v1").prefix, str(out), "--to", "torchvision:inception_v3", "--no-fsync")
    line = assert_one_line_error(r, "port map torchvision:inception_v3 does not fit", "missing from the checkpoint (388): InceptionV3/",
                                 "not used by the map", "InceptionV1/Conv2d_1a_7x7/")
    assert "more" in line  # long lists are cut, with the count
    assert os.listdir(tmp_path) == []


def _state_dict(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _save_state_dict(tensors: Mapping[str, np.ndarray], path: str) -> str:
    from safetensors.numpy import save_file

    save_file(dict(tensors), path)
    return path


def _refused_import(archive: str, root: Any, *needles: str) -> str:
    """``import ARCHIVE --model NET --from MAP`` fails with one line holding ``needles``; nothing is written."""
    pmap = MAPS[FORMATS_MAP]
    before = sorted(os.listdir(root))
    r = cli("import", archive, str(root / "out" / "model.ckpt"), "--model", pmap.net, "--from", FORMATS_MAP, "--no-fsync")
    line = assert_one_line_error(r, f"port map {FORMATS_MAP} does not fit {archive}", *needles)
    assert sorted(os.listdir(root)) == before
    return line


def test_import_missing_a_tensor_is_refused(ports: Ports, tmp_path: Any) -> None:
    state = _state_dict(ports[FORMATS_MAP].exported)
    del state["inception4a.branch2.1.conv.weight"]
    archive = _save_state_dict(state, str(tmp_path / "missing.safetensors"))
    line = _refused_import(archive, tmp_path, "missing from the archive (1): inception4a.branch2.1.conv.weight")
    assert line.count("inception4a.branch2.1.conv.weight") == 1


def test_import_of_a_gamma_slim_cannot_carry_is_refused(ports: Ports, tmp_path: Any) -> None:
    """slim's batch norm here has no gamma: a state_dict whose bn.weight is not all ones cannot be carried."""
    state = _state_dict(ports[FORMATS_MAP].exported)
    state["conv2.bn.weight"] = state["conv2.bn.weight"].copy()
    state["conv2.bn.weight"][3] = 0.5
    archive = _save_state_dict(state, str(tmp_path / "gamma.safetensors"))
    _refused_import(archive, tmp_path, "cannot carry", "conv2.bn.weight (must be all 1)")


def test_dry_run_prints_the_mapping_and_writes_nothing(slim: SlimNets, ports: Ports, tmp_path: Any) -> None:
    pmap = MAPS[FORMATS_MAP]
    s = slim.get(pmap.net)
    out = tmp_path / "out.safetensors"
    r = cli("export", s.prefix, str(out), "--to", FORMATS_MAP, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    kinds = ("layout ", "add ", "caveat: ", "drop ", "ema: ", "dry run: ")
    pairs = sorted(tuple(ln.split(" -> ")) for ln in lines if not ln.startswith(kinds))
    assert pairs == sorted((r_.source, r_.dest) for r_ in pmap.rules)
    adds = sorted(ln for ln in lines if ln.startswith("add "))
    assert len(adds) == len(pmap.added)
    assert all(ln.startswith(f"add {a.dest}: filled with {a.fill:g}") for ln, a in zip(adds, sorted(pmap.added, key=lambda a: a.dest)))
    assert [ln for ln in lines if ln.startswith("caveat: ")] == [f"caveat: {c}" for c in pmap.caveat_lines()]
    assert lines[-1].startswith(f"dry run: would write {len(pmap.rules) + len(pmap.added)} tensors")
    assert os.listdir(tmp_path) == []
    # The way back: destination names -> slim names, what the slim net drops, the same caveats; nothing written.
    r = cli("import", ports[FORMATS_MAP].exported, str(tmp_path / "out" / "model.ckpt"), "--model", pmap.net, "--from", FORMATS_MAP,
            "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pairs = sorted(tuple(ln.split(" -> ")) for ln in lines if not ln.startswith(kinds))
    assert pairs == sorted((r_.dest, r_.source) for r_ in pmap.rules)
    assert sorted(ln.split(":")[0] for ln in lines if ln.startswith("drop ")) == sorted(f"drop {a.dest}" for a in pmap.added)
    assert [ln for ln in lines if ln.startswith("caveat: ")] == [f"caveat: {c}" for c in pmap.caveat_lines()]
    assert os.listdir(tmp_path) == []


def test_export_reads_the_moving_averages(slim: SlimNets, tmp_path: Any) -> None:
    """A checkpoint with X/ExponentialMovingAverage shadows exports the shadows' values, and says so."""
    pmap = MAPS[FORMATS_MAP]
    tensors = read_all(slim.get(pmap.net).prefix)
    trainable = sorted(n for n in tensors if n.endswith(("/weights", "/biases", "/beta")))
    assert len(trainable) > 100
    for n in trainable:
        tensors[n + "/ExponentialMovingAverage"] = (tensors[n] * np.float32(0.5) + np.float32(0.25)).astype(np.float32)
    # What else a trained checkpoint holds: the step (the map skips it), an optimizer slot (never carried).
    tensors["global_step"] = np.array(1000, np.int64)
    slot = "InceptionV1/Conv2d_1a_7x7/weights/Momentum"
    tensors[slot] = np.ones_like(tensors["InceptionV1/Conv2d_1a_7x7/weights"])
    prefix = write_checkpoint(str(tmp_path / "ema" / "model.ckpt"), tensors)
    out = str(tmp_path / "ema.safetensors")
    report = ckptbridge.export(prefix, out, ckptbridge.Port(FORMATS_MAP), fsync=False)
    by_source = {r.source: r.dest for r in pmap.rules}
    assert report.ema_swaps == {by_source[n]: n + "/ExponentialMovingAverage" for n in trainable}
    assert sorted(report.dropped) == sorted([*trainable, "global_step", slot])
    assert all("EMA" in report.dropped[n] for n in trainable)
    assert "skipped by port map" in report.dropped["global_step"] and "optimizer state" in report.dropped[slot]
    # The command line tells it too: one "ema:" line per shadow read.
    r = cli("export", prefix, str(tmp_path / "dry.safetensors"), "--to", FORMATS_MAP, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert sorted(ln for ln in r.stdout.splitlines() if ln.startswith("ema: ")) == sorted(
        f"ema: {by_source[n]} <- {n}/ExponentialMovingAverage" for n in trainable)
    got = read_all(out)
    want = expected_state_dict(pmap, tensors, ema=True)
    for dest, w in want.items():
        assert same(got[dest], w), dest
    # The moving statistics have no shadow: their own values, as the slim net uses them.
    assert same(got["conv1.bn.running_mean"], tensors["InceptionV1/Conv2d_1a_7x7/BatchNorm/moving_mean"])
    assert not same(got["conv1.conv.weight"], expected_state_dict(pmap, read_all(slim.get(pmap.net).prefix))["conv1.conv.weight"])


# --------------------------------------------------------------------------- archive formats


def test_npz_and_h5_carry_the_same_state_dict(ports: Ports, tmp_path: Any) -> None:
    port = ports[FORMATS_MAP]
    st = read_all(port.exported)
    for suffix in ("npz", "h5"):
        got = read_all(port.extra[suffix])
        assert sorted(got) == sorted(st), suffix
        for n in st:
            assert same(got[n], st[n]), f"{suffix}: {n}"
    # torch_side loads the .npz as it is (0-d num_batches_tracked included, strict=True) and computes slim's logits.
    npz = port.npz_patched
    for what, slim_out in port.slim.out.items():
        assert rel(npz[what], destination_classes(port.pmap, slim_out)) <= AGREE
    # And back: import --from reads each format to the same slim tensors.
    back = {}
    for suffix, archive in (("safetensors", port.exported), ("npz", port.extra["npz"]), ("h5", port.extra["h5"])):
        back[suffix] = str(tmp_path / suffix / "model.ckpt")
        report = ckptbridge.rebuild(archive, back[suffix], ckptbridge.Port(FORMATS_MAP), fsync=False)
        assert len(report.written) == len(port.pmap.rules), suffix
    for suffix in ("npz", "h5"):
        d = ckptbridge.diff(back["safetensors"], back[suffix])
        assert d.identical and d.compared == len(port.pmap.rules), (suffix, d)


# --------------------------------------------------------------------------- 3. the destination computes slim's logits


@pytest.mark.parametrize("name", _params(SLOW_MAPS))
def test_destination_as_shipped(ports: Ports, name: str) -> None:
    """Without caveats the destination as shipped computes slim's logits; with caveats it does not (the caveat is real)."""
    port = ports[name]
    for what, slim_out in port.slim.out.items():
        d = rel(port.shipped[what], destination_classes(port.pmap, slim_out))
        print(f"{name} {what}: as shipped {d:.3g}")
        if port.pmap.caveats:
            assert d > DIFFER, f"{name} {what}: the caveats say the destination as shipped differs, yet it agrees ({d:.3g})"
        else:
            assert d <= AGREE, f"{name} {what}: destination as shipped is {d:.3g} from slim"


@pytest.mark.parametrize("name", _params(SLOW_MAPS))
def test_destination_with_tensorflow_semantics(ports: Ports, name: str) -> None:
    """Patched to TensorFlow's semantics (the caveats' fixes), the destination computes slim's logits (and aux logits)."""
    port = ports[name]
    assert sorted(port.patched) == sorted(port.slim.out)
    for what, slim_out in port.slim.out.items():
        want = destination_classes(port.pmap, slim_out)
        assert np.abs(want).max() > 1.0, f"{what}: logits this small prove little"
        d = rel(port.patched[what], want)
        print(f"{name} {what}: patched {d:.3g}")
        assert d <= AGREE, f"{name} {what}: the patched destination is {d:.3g} from slim"


# --------------------------------------------------------------------------- 4. the other way


@pytest.mark.parametrize("name", _params(SLOW_BOTH_WAYS))
def test_import_from_destination_computes_the_same(ports: Ports, slim: SlimNets, name: str, tmp_path: Any) -> None:
    """A random state_dict imported through the map and restored by TensorFlow computes the patched destination's logits."""
    port = ports[name]
    pmap = port.pmap
    destination = port.random_patched  # waits for torch_side, which writes the random weights
    prefix = str(tmp_path / "out" / "model.ckpt")
    report = ckptbridge.rebuild(port.random_weights, prefix, ckptbridge.Port(name), graph=ckptbridge.Graph(pmap.net), fsync=False)
    assert report.missing == [] and report.port == name and report.caveats == pmap.caveat_lines()
    assert leftovers(tmp_path) == []
    back = read_all(prefix)
    for n in class_tensors(pmap):
        if has_background(pmap):
            assert back[n].shape[-1] == pmap.source_classes
            assert not np.any(back[n][..., 0]), f"{n}: the inserted background class must be zeros"
    # The weights themselves, bit for bit: what the map's rules make of the checkpoint is the state_dict imported.
    state = read_all(port.random_weights)
    for dest, arr in expected_state_dict(pmap, back).items():
        assert same(arr, state[dest]), dest
    got = slim.logits_of(pmap.net, prefix)
    for what, want in destination.items():
        if has_background(pmap):
            assert np.all(got[what][:, 0] == 0), f"{what}: the background class's logit must be 0 (zero weights and bias)"
        d = rel(destination_classes(pmap, got[what]), want)
        print(f"{name} {what}: reverse {d:.3g}")
        assert np.abs(want).max() > 1.0
        assert d <= AGREE, f"{name} {what}: slim restored from the imported checkpoint is {d:.3g} from the destination"
