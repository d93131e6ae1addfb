"""Coordinate conventions, transforms, warping and transform files.

The conventions are stated once, in :mod:`carctl.spatial.grid`.
"""
