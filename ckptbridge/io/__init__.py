"""Where the bytes are, and how outputs appear: ranged files, remote places, archives of checkpoints,
atomic outputs, durability, signals, threads, block streams and the protobuf wire reader."""
