"""carctl: contrast-agnostic medical image registration from the command line.

Importing this package is cheap: nothing heavy (torch, SimpleITK) is imported here.
"""

__version__ = "0.1.0"
