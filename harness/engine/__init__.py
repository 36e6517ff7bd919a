"""Training engine: the loop (`trainer`), its schedule and its checkpoints."""
