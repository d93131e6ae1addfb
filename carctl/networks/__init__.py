"""Neural networks that carctl ships (architectures only; weights in :mod:`carctl.pretrained`)."""
