"""Flax NNX models, one module per family (``vit``: the patch encoder)."""
