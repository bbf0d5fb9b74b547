"""The U-Net family. `registry` is importable without torch; everything else needs torch."""

from .registry import ARCHITECTURES, ArchitectureSpec, build_network, get_architecture, list_architectures

__all__ = ["ARCHITECTURES", "ArchitectureSpec", "build_network", "get_architecture", "list_architectures"]
