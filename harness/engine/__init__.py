"""Training: the loop (`loop.Trainer`), the engines it runs steps on (`engines/`: local, DDP, DeepSpeed, one
interface), and the components beside it (evaluation, checkpoint, precision, schedule, progress, the
method hooks' `context`); `launch` runs a recipe end to end."""
