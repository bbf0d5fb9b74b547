"""Quality-control pictures that people look at before they read numbers.

`segmentation_png`: three orthogonal slices (axial, coronal, sagittal) through the centroid of the
segments, drawn at physical aspect ratio (thick slices stay thick), grey-scale from the 1st-99th
intensity percentiles, with each segment's outline in its label colour. The PNG is encoded here
(zlib + CRC, no imaging library), so QC works wherever the backend runs.
`dice_boxplot_png`: Dice per label over cases (matplotlib, Agg backend, imported on demand).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

PIXELS_PER_MM = 2.0  # enough to see one-voxel outlines of 1 mm data; bounded below for large scans
MAX_PANEL_PIXELS = 512  # per side, so a 500 mm CT still gives a small file
GAP = 4


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG from an (H, W, 3) uint8 array."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, mode="constant")
    inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.minimum((np.arange(height) + 0.5) * array.shape[0] / height, array.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * array.shape[1] / width, array.shape[1] - 1).astype(int)
    return array[rows][:, cols]


def _panel(image: np.ndarray, labels: np.ndarray, spacing_rows_cols: Sequence[float], colors: dict,
           window: tuple[float, float]) -> np.ndarray:
    """One slice as RGB at physical aspect; outlines drawn after scaling so they stay one pixel wide."""
    extent = [n * s for n, s in zip(image.shape, spacing_rows_cols)]
    scale = min(PIXELS_PER_MM, MAX_PANEL_PIXELS / max(extent))
    height, width = (max(1, int(round(e * scale))) for e in extent)
    low, high = window
    grey = np.clip((image.astype(np.float64) - low) / max(high - low, 1e-8), 0, 1)
    grey = (_resize_nearest(grey, height, width) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    scaled_labels = _resize_nearest(labels, height, width)
    for value, color in colors.items():
        edge = _outline(scaled_labels == value)
        rgb[edge] = color
    return rgb


def segmentation_png(image: sitk.Image, labelmap: sitk.Image, label_colors: dict[int, Sequence[float]]) -> bytes:
    """PNG bytes: axial | coronal | sagittal through the segments' centroid (the volume's centre if empty).

    `label_colors` maps label value -> RGB in 0..1 (as on the model card).
    """
    canonical_image = sitk.DICOMOrient(image, "LPS")
    canonical_labels = sitk.DICOMOrient(labelmap, "LPS")
    volume = sitk.GetArrayViewFromImage(canonical_image)  # (z: I->S, y: A->P, x: R->L)
    labels = sitk.GetArrayViewFromImage(canonical_labels)
    if volume.shape != labels.shape:
        raise ValueError(f"image {volume.shape} and labelmap {labels.shape} differ")
    foreground = np.argwhere(labels > 0)
    centre = (foreground.mean(axis=0) if len(foreground) else (np.array(volume.shape) - 1) / 2).round().astype(int)
    z, y, x = (int(c) for c in centre)
    sx, sy, sz = canonical_image.GetSpacing()
    sample = np.asarray(volume)[:: max(1, volume.shape[0] // 16)]
    window = tuple(float(v) for v in np.percentile(sample, (1, 99)))
    colors = {int(value): tuple(int(round(255 * c)) for c in rgb) for value, rgb in label_colors.items()
              if int(value) != 0}
    # radiological display: patient's right on the left of the picture, superior up, anterior up (axial)
    panels = [
        _panel(volume[z], labels[z], (sy, sx), colors, window),  # axial: rows A->P, cols R->L
        _panel(volume[::-1, y, :], labels[::-1, y, :], (sz, sx), colors, window),  # coronal: rows S->I
        _panel(volume[::-1, :, x], labels[::-1, :, x], (sz, sy), colors, window),  # sagittal: cols A->P
    ]
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    column = 0
    for panel in panels:
        canvas[: panel.shape[0], column: column + panel.shape[1]] = panel
        column += panel.shape[1] + GAP
    return encode_png(canvas)


def dice_boxplot_png(scores: dict[str, Sequence[float]], title: str = "Dice per label") -> bytes:
    """A box plot (one box per label, cases as dots) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    names = list(scores)
    figure = Figure(figsize=(1.6 + 1.4 * len(names), 3.6), dpi=100)
    axes = figure.subplots()
    data = [np.asarray(scores[name], dtype=float) for name in names]
    axes.boxplot([d[np.isfinite(d)] for d in data], tick_labels=names, showmeans=True)
    rng = np.random.default_rng(0)
    for position, values in enumerate(data, start=1):
        axes.scatter(position + rng.uniform(-0.12, 0.12, len(values)), values, s=8, alpha=0.5, color="tab:blue")
    axes.set_ylim(min(0.0, *(float(np.nanmin(d)) for d in data if d.size)) if any(d.size for d in data) else 0, 1.02)
    axes.set_ylabel("Dice")
    count = max((len(d) for d in data), default=0)
    axes.set_title(f"{title} ({count} case{'s' if count != 1 else ''})")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_png(data: bytes, path, overwrite: bool = False, cancel=None) -> Path:
    """Publish PNG bytes with the project's temp-file and no-overwrite rules."""
    from .publish import temporary_output

    path = Path(path)
    with temporary_output(path, overwrite, suffix=".png", cancel=cancel) as temp:
        Path(temp).write_bytes(data)
    return path
