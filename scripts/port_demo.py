"""The demo's last step: a resnet_v1_50 port, loaded into torchvision's resnet50 and matched to TensorFlow.

    python scripts/port_demo.py RESNET50.npz

The archive is ``ckptbridge export CKPT RESNET50.npz --to torchvision:resnet50``.  It loads with
``strict=True``; ``ckptbridge.match_tensorflow`` then makes the model compute what slim's
resnet_v1_50 computes (the strides moved, pool1 padded as 'SAME'), at any input size.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torchvision

import ckptbridge


def main() -> None:
    state = {k: torch.from_numpy(v) for k, v in ckptbridge.load(sys.argv[1]).items()}  # records are not tensors
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(state, strict=True)
    model = ckptbridge.match_tensorflow(model, "torchvision:resnet50").eval()
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        logits = model(x)
    print(f"torchvision resnet50: {len(state)} tensors loaded strict, matched to TensorFlow; "
          f"logits {tuple(logits.shape)}, top class {int(logits.argmax())}")


if __name__ == "__main__":
    main()
