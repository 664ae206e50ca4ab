"""Network definitions, the shared preprocessing and the checkpoint format (the training/serving contract)."""

__version__ = "0.1.0"
