"""On-disk cache of converted networks (OpenVINO IR), so a second run starts at once.

Key: the network's content hash (its weights and configuration), the input shape (window size, or
the padded volume for whole-volume mode), backend, precision and the OpenVINO version; a change to
any of them is a new entry. Entries are written to a temporary folder inside the cache and renamed
into place (the `.xml` last, so a reader never sees half an entry), and the folder is kept under a
size cap by evicting the least recently used entries. OpenVINO's own compiled-blob cache lives in
the `compiled/` subfolder and counts toward the same cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

CACHE_ENV = "UNETSEGMENT_CACHE_DIR"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$UNETSEGMENT_CACHE_DIR, else the platform's user cache folder + UNetSegment/openvino."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "UNetSegment" / "Cache"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "UNetSegment"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unetsegment"
    return base / "openvino"


def weights_hash(network) -> str:
    """SHA-256 of the network's class, configuration and every state_dict tensor (name, dtype,
    shape, bytes): changed weights give a new key even when the file name stays the same."""
    import torch

    digest = hashlib.sha256()
    digest.update(type(network).__qualname__.encode())
    digest.update(repr(getattr(network, "config", "")).encode())
    for name, tensor in network.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(content_hash: str, input_shape: Iterable[int], backend: str, precision: str,
              runtime_version: str, extra: str = "") -> str:
    record = {"format": CACHE_FORMAT, "content": content_hash, "shape": [int(s) for s in input_shape],
              "backend": backend, "precision": precision, "version": runtime_version, "extra": extra}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


class ModelCache:
    """Folder of `<key>.xml` + `<key>.bin` IR pairs with atomic stores and an LRU size cap."""

    def __init__(self, folder: Optional[os.PathLike] = None, max_mb: float = 2048.0):
        self.folder = Path(folder) if folder else default_cache_dir()
        self.max_bytes = int(max_mb * 2 ** 20)

    @property
    def compiled_dir(self) -> Path:
        return self.folder / "compiled"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.xml", self.folder / f"{key}.bin"

    def lookup(self, key: str) -> Optional[Path]:
        """The entry's .xml path when both files are there (touched, for LRU), else None."""
        xml, weights = self.paths(key)
        if xml.is_file() and weights.is_file():
            now = time.time()
            for path in (xml, weights):
                try:
                    os.utime(path, (now, now))
                except OSError:
                    pass
            return xml
        return None

    def store(self, key: str, save) -> Path:
        """`save(xml_path)` writes an IR pair into a private temporary folder; the pair is then
        renamed into place (.bin first, .xml last) and the cache pruned to its cap."""
        self.folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            save(scratch / "model.xml")
            xml, weights = self.paths(key)
            os.replace(scratch / "model.bin", weights)
            os.replace(scratch / "model.xml", xml)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.prune(keep=(xml, weights))
        return xml

    def remove(self, key: str) -> None:
        for path in self.paths(key):
            try:
                path.unlink()
            except OSError:
                pass

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [path for path in self.folder.rglob("*") if path.is_file() and ".tmp-" not in str(path)]

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self._files())

    def prune(self, keep: Iterable[Path] = ()) -> list[Path]:
        """Delete least recently used files until the folder is under the cap; returns what went."""
        keep = {Path(path) for path in keep}
        files = []
        for path in self._files():
            try:
                stat = path.stat()
            except OSError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = []
        for _, size, path in sorted(files, key=lambda item: item[0]):
            if total <= self.max_bytes:
                break
            if path in keep:
                continue
            # an IR pair goes together: a lone .bin or .xml is useless
            partners = [path] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else
                                 [path.with_suffix(".xml")] if path.suffix == ".bin" else [])
            for victim in partners:
                if victim in keep or victim in removed:
                    continue
                try:
                    victim_size = victim.stat().st_size
                    victim.unlink()
                except OSError:
                    continue
                total -= victim_size
                removed.append(victim)
        return removed
