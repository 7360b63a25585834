"""Port maps: the map model, the TOML maps in ``maps/``, and the views that port a checkpoint."""
