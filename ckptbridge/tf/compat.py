"""TensorFlow, tf-keras and tf-slim on current releases, in one place.

tf-slim 1.1.0 (its last release) reaches Keras' legacy layers through
``tf_keras.legacy_tf_layers``; tf-keras >= 2.16 ships them as
``tf_keras.src.legacy_tf_layers``.  Without an alias ``slim.batch_norm`` (so
resnet and inception) raises ModuleNotFoundError.  :func:`import_slim` aliases
the package and each of its modules in ``sys.modules`` before tf-slim builds a
layer.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Iterator
from types import ModuleType

from ..errors import MissingDependencyError

_HINT = "install it with: pip install 'ckptbridge[tf]'"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ log lines TensorFlow prints while it loads (CUDA probes and such).

    Set CKPTBRIDGE_TF_LOGS=1 to see them.  Python exceptions are unaffected.
    """
    if os.environ.get("CKPTBRIDGE_TF_LOGS") or "tensorflow" in sys.modules:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow() -> ModuleType:
    """Import TensorFlow quietly, or raise MissingDependencyError naming the extra."""
    if "tensorflow" not in sys.modules and not os.environ.get("CKPTBRIDGE_TF_LOGS"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        with _quiet_stderr():
            tf = importlib.import_module("tensorflow")  # a module (TensorFlow ships no types)
    except ImportError as e:
        raise MissingDependencyError(f"TensorFlow is needed for this ({e}); {_HINT}") from None
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    tf.get_logger().setLevel("ERROR")
    return tf


def _alias_legacy_layers() -> None:
    if "tf_keras.legacy_tf_layers" in sys.modules:
        return
    try:
        importlib.import_module("tf_keras.legacy_tf_layers")
        return  # an older tf-keras that still ships the public module
    except ImportError:
        pass
    try:
        src = importlib.import_module("tf_keras.src.legacy_tf_layers")
    except ImportError as e:
        raise MissingDependencyError(f"tf-keras is needed for tf-slim's layers ({e}); {_HINT}") from None
    sys.modules["tf_keras.legacy_tf_layers"] = src
    for mod in pkgutil.iter_modules(src.__path__):
        full = f"tf_keras.src.legacy_tf_layers.{mod.name}"
        sys.modules.setdefault(f"tf_keras.legacy_tf_layers.{mod.name}", importlib.import_module(full))


def import_slim() -> ModuleType:
    """Import tf_slim with the tf-keras shim applied."""
    import_tensorflow()
    _alias_legacy_layers()
    try:
        tf_slim = importlib.import_module("tf_slim")
    except ImportError as e:
        raise MissingDependencyError(f"tf-slim is needed for this ({e}); {_HINT}") from None
    return tf_slim
