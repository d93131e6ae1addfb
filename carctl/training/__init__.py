"""Training the networks that carctl ships (``carctl train ...``)."""
