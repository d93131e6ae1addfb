"""Coordinate conventions, transforms, warping and transform files; see :mod:`carctl.spatial.grid`."""
