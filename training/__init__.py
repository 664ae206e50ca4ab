"""Data, augmentation, losses, metrics, training and evaluation loops, and the `medserve` CLI."""
