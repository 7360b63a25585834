"""Write a random-initialised tf-slim checkpoint (the demo's input).

    python scripts/make_demo_checkpoint.py OUT_DIR [--model resnet_v1_50] [--num-classes 10]
"""

from __future__ import annotations

import argparse
import os

from ckptbridge.tf.compat import import_tensorflow
from ckptbridge.tf.slim import build_net


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--model", default="resnet_v1_50")
    p.add_argument("--num-classes", type=int, default=10)
    args = p.parse_args()
    tf = import_tensorflow()
    os.makedirs(args.out_dir, exist_ok=True)
    graph, _, _ = build_net(args.model, args.num_classes)
    with graph.as_default():
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            path = saver.save(sess, os.path.join(args.out_dir, "model.ckpt"), global_step=1000)
    print(path)


if __name__ == "__main__":
    main()
