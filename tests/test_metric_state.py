"""Keras metrics' variables under --weights-only: left out, as "metric state", not "optimizer state" (issue 21).

On f835772 ``export --weights-only`` listed ``keras_api/metrics/*`` (the totals and
counts of a tf_keras model's compiled metrics, kept in its SavedModel) as dropped
for being "optimizer state".  They are not the optimizer's; they are not model
weights either, so weights-only still leaves them out, for the true reason.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import ckptbridge

from helpers import in_process

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "savedmodel")
# tf_keras's model.save(dir) of a Dense-BatchNorm-Dense model compiled with Adam and an "mae" metric (test_savedmodel.py).
KERAS_DENSE = os.path.join(DATA, "keras_dense")


def test_the_cli_names_metric_state_for_what_it_is() -> None:
    rc, out, err = in_process("export", KERAS_DENSE, "unused.npz", "--weights-only", "--dry-run")
    assert rc == 0, err
    drops = [line for line in out.splitlines() if line.startswith("drop ")]
    metric = [line for line in drops if "keras_api/metrics/" in line]
    assert len(metric) == 4, drops  # the loss and "mae" metrics' total and count
    assert all(line.endswith(": metric state (weights only)") for line in metric), metric
    assert all(line.endswith(": optimizer state (weights only)") for line in drops if line not in metric), drops


@pytest.mark.tf
def test_weights_only_keeps_the_model_weights_of_a_savedmodel_with_metrics(tmp_path: Any) -> None:
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("tf_keras")

    keras.utils.set_random_seed(21)
    inp = keras.Input((4,))
    x = keras.layers.Dense(3, activation="relu", name="hidden")(inp)
    m = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="head")(x))
    m.compile(optimizer="adam", loss="binary_crossentropy", metrics=["mae", keras.metrics.AUC(num_thresholds=5, name="auc")])
    rng = np.random.default_rng(21)
    m.fit(rng.normal(size=(16, 4)).astype(np.float32), (rng.random((16, 1)) > 0.5).astype(np.float32), verbose=0)
    saved = str(tmp_path / "saved")
    m.save(saved)
    variables = os.path.join(saved, "variables", "variables")
    keys = [k for k, _ in tf.train.list_variables(variables)]
    metric_keys = {k for k in keys if k.startswith("keras_api/metrics/")}
    assert any("/auc/" in k or "true_positives" in k for k in metric_keys), metric_keys  # a metric with state of its own

    out = str(tmp_path / "w.npz")
    report = ckptbridge.export(saved, out, ckptbridge.Naming(select=ckptbridge.Select(weights_only=True)))
    want = sorted(f"{w.name.split('/')[0]}/{w.name.split('/')[-1].split(':')[0]}" for w in m.weights)
    assert sorted(report.written) == want  # the model's weights, and nothing else
    dropped = dict(report.dropped)
    with ckptbridge.read(saved) as r:
        key = {n: r.metadata()["original_names"].get(n, n) for n in r}  # a readable name hides the AUC's keys
    metrics = {n for n in dropped if key[n] in metric_keys}
    assert {key[n] for n in metrics} == metric_keys, "every metric variable is left out"
    assert any(n not in metric_keys for n in metrics), "no metric variable under a readable name: the key's reason is not tested"
    for n, why in dropped.items():
        assert why == ("metric state" if n in metrics else "optimizer state") + " (weights only)", (n, why)

    reader = tf.train.load_checkpoint(variables)
    with ckptbridge.read(out) as got:
        originals = got.metadata()["original_names"]
        for name in got:
            expect = reader.get_tensor(originals[name])
            assert got[name].dtype == expect.dtype and got[name].tobytes() == expect.tobytes(), name
