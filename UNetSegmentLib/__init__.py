"""UNetSegmentLib: the PyTorch backend of the UNetSegment 3D Slicer extension.

Importing this package must stay cheap and must not import torch, so that Slicer's panel can list
architectures and models before PyTorch is installed. Heavy modules are imported where used.
"""

__version__ = "0.1.0"
