"""Synthetic CT-like abdominal phantom with three organ labels, in the Decathlon / nnU-Net layout.

The project ships no real labelled data, so the default model is trained on this phantom. It is
built to be a fair, not a trivial, task: organs are deformed, rotated ellipsoids at plausible
positions whose Hounsfield units sit close to their neighbours (muscle, bowel, vessels), with CT
noise, a smooth intensity bias, partial-volume blur and anisotropic, per-case spacing.

Axes: arrays are numpy (z, y, x); physical coordinates are LPS millimetres (x towards the
patient's left, y posterior, z superior), as SimpleITK and Slicer use.

Command line: `python -m UNetSegmentLib.phantom --out DIR --cases N --seed S`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError

LABEL_NAMES = {0: "background", 1: "liver", 2: "spleen", 3: "kidney"}
# Colours of Slicer's GenericAnatomyColors table, so segments look familiar in Slicer.
LABEL_COLORS = {
    0: (0.0, 0.0, 0.0),
    1: (221 / 255, 130 / 255, 101 / 255),
    2: (157 / 255, 108 / 255, 162 / 255),
    3: (185 / 255, 102 / 255, 83 / 255),
}
FIELD_OF_VIEW_MM = (224.0, 176.0, 120.0)  # x, y, z
AIR_HU = -1000.0


@dataclass
class PhantomCase:
    image: np.ndarray  # int16 Hounsfield units, (z, y, x)
    label: np.ndarray  # uint8 label values 0..3, (z, y, x)
    spacing: tuple[float, float, float]  # mm, (x, y, z)
    origin: tuple[float, float, float]  # mm, (x, y, z)

    def to_sitk(self):
        """(image, label) as SimpleITK images with this case's geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.image)
        label = sitk.GetImageFromArray(self.label)
        for item in (image, label):
            item.SetSpacing(self.spacing)
            item.SetOrigin(self.origin)
        return image, label


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_points: int = 5) -> np.ndarray:
    """Random field that varies slowly over the volume, unit standard deviation."""
    coarse = rng.standard_normal((control_points,) * len(shape))
    # cubic up to a quarter of the size, then linear: smooth, and 50x cheaper than cubic all the way
    middle = ndimage.zoom(coarse, [max(2, s // 4) / control_points for s in shape], order=3, mode="nearest")
    field = ndimage.zoom(middle, [s / m for s, m in zip(shape, middle.shape)], order=1, mode="nearest")
    field = field[tuple(slice(0, s) for s in shape)]
    return (field - field.mean()) / (field.std() + 1e-6)


def _rotation(rng: np.random.Generator, in_plane_deg: float, tilt_deg: float) -> np.ndarray:
    """Rotation matrix (x, y, z): mostly about z (axial plane), slightly tilted."""
    a, b, c = np.deg2rad([rng.uniform(-in_plane_deg, in_plane_deg),
                          rng.uniform(-tilt_deg, tilt_deg), rng.uniform(-tilt_deg, tilt_deg)])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


class _Grid:
    """Physical coordinates of every voxel centre, relative to the body centre."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        z, y, x = (np.arange(n, dtype=np.float32) for n in shape)
        sx, sy, sz = spacing
        self.x = ((x - (shape[2] - 1) / 2) * sx)[None, None, :]
        self.y = ((y - (shape[1] - 1) / 2) * sy)[None, :, None]
        self.z = ((z - (shape[0] - 1) / 2) * sz)[:, None, None]
        self.shape = shape

    def ellipsoid_radius(self, centre, semi_axes, rotation) -> np.ndarray:
        """Normalised ellipsoidal radius: < 1 inside the (rotated) ellipsoid."""
        dx, dy, dz = self.x - centre[0], self.y - centre[1], self.z - centre[2]
        total = np.zeros(self.shape, dtype=np.float32)
        for axis in range(3):  # coordinates in the ellipsoid frame: R^T (p - c)
            local = rotation[0, axis] * dx + rotation[1, axis] * dy + rotation[2, axis] * dz
            total += (local / semi_axes[axis]) ** 2
        return np.sqrt(total)

    def ellipse_radius(self, centre_xy, semi_axes_xy) -> np.ndarray:
        """Normalised radius of an axial ellipse, the same in every slice (body, spine, vessels)."""
        value = ((self.x - centre_xy[0]) / semi_axes_xy[0]) ** 2 + ((self.y - centre_xy[1]) / semi_axes_xy[1]) ** 2
        return np.broadcast_to(np.sqrt(value), self.shape)


def make_case(seed: int, spacing: tuple[float, float, float] | None = None) -> PhantomCase:
    """One phantom case; the same seed always gives the same case."""
    rng = np.random.default_rng(seed)
    if spacing is None:
        in_plane = float(rng.choice([1.4, 1.5, 1.6, 1.7]))
        spacing = (in_plane, in_plane, float(rng.choice([2.5, 3.0, 3.5])))
    shape = tuple(int(round(fov / s)) for fov, s in zip(FIELD_OF_VIEW_MM[::-1], spacing[::-1]))
    grid = _Grid(shape, spacing)
    image = np.full(shape, AIR_HU, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    size = rng.uniform(0.9, 1.1)  # patient size

    # Body wall: skin/subcutaneous fat, muscle, then visceral fat inside.
    body_axes = (rng.uniform(92, 104) * size, rng.uniform(66, 76) * size)
    body_centre = (rng.uniform(-5, 5), rng.uniform(-4, 4))
    outline = _smooth_field(rng, shape, 4) * 0.02
    body = grid.ellipse_radius(body_centre, body_axes) + outline
    fat_depth, muscle_depth = rng.uniform(6, 16), rng.uniform(8, 12)
    muscle = grid.ellipse_radius(body_centre, (body_axes[0] - fat_depth, body_axes[1] - fat_depth)) + outline
    inside = grid.ellipse_radius(body_centre, (body_axes[0] - fat_depth - muscle_depth,
                                               body_axes[1] - fat_depth - muscle_depth)) + outline
    image[body < 1] = rng.uniform(-110, -90)
    image[muscle < 1] = rng.uniform(45, 60)
    image[inside < 1] = rng.uniform(-100, -80)
    cavity = inside < 1

    # Bowel: soft-tissue loops with gas pockets filling the anterior cavity.
    bowel = (_smooth_field(rng, shape, 7) > 0.2) & cavity & (grid.y < body_centre[1] + 10)
    image[bowel] = rng.uniform(15, 40)
    gas = bowel & (_smooth_field(rng, shape, 9) > 1.6)
    image[gas] = rng.uniform(-900, -700)

    # Organs, painted so that later ones never overwrite earlier ones; each is a deformed ellipsoid.
    cx, cy = body_centre
    organs = [  # label, HU mean, centre (x, y, z) mm, semi-axes mm, in-plane rotation range deg
        (3, 175.0, (cx - 50, cy + 20, -15.0), (20.0, 16.0, 38.0), 25),
        (3, 175.0, (cx + 52, cy + 22, -5.0), (20.0, 16.0, 38.0), 25),
        (2, 122.0, (cx + 58, cy + 22, 28.0), (20.0, 36.0, 32.0), 30),
        (1, 102.0, (cx - 42, cy - 2, 22.0), (56.0, 50.0, 48.0), 15),
    ]
    for value, hu, centre, semi_axes, in_plane_deg in organs:
        centre = tuple(c + rng.uniform(-8, 8) for c in centre)
        semi_axes = tuple(a * size * rng.uniform(0.85, 1.15) for a in semi_axes)
        radius = grid.ellipsoid_radius(centre, semi_axes, _rotation(rng, in_plane_deg, 10))
        mask = (radius + 0.12 * _smooth_field(rng, shape, 5) < 1) & cavity & (label == 0)
        image[mask] = rng.normal(hu, 8) + 6 * _smooth_field(rng, shape, 8)[mask]
        if value == 3:  # renal sinus: darker fat and collecting system inside the kidney
            image[mask & (radius < 0.45)] = rng.uniform(-20, 30)
        label[mask] = value

    # Spine, spinal canal, aorta and inferior vena cava: bright or organ-like distractors.
    spine_centre = (cx + rng.uniform(-3, 3), cy + body_axes[1] - fat_depth - muscle_depth - 12)
    vertebra = grid.ellipse_radius(spine_centre, (16, 14))
    image[(vertebra < 1) & (label == 0)] = rng.uniform(650, 800)
    image[(vertebra < 0.8) & (label == 0)] = rng.uniform(180, 260)
    canal = grid.ellipse_radius((spine_centre[0], spine_centre[1] + 22), (7, 7)) < 1
    image[canal & (label == 0)] = rng.uniform(15, 35)
    for offset, radius_mm, hu in ((12, 10, rng.uniform(150, 220)), (-16, 11, rng.uniform(100, 140))):
        vessel = grid.ellipse_radius((spine_centre[0] + offset, spine_centre[1] - 26), (radius_mm, radius_mm)) < 1
        image[vessel & (label == 0)] = hu

    # Ribs: short bright arcs just inside the body wall, periodic along z.
    rib_rows = np.cos(2 * np.pi * (grid.z + rng.uniform(0, 28)) / 28) > 0.55
    rib_ring = (inside > 0.99) & (inside < 1.07) & (grid.y > cy - 30)
    image[np.broadcast_to(rib_rows, shape) & rib_ring] = rng.uniform(500, 800)

    # Scanner: partial-volume blur (thicker along z), smooth bias, quantum noise.
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.5, 0.5))
    image += rng.uniform(8, 20) * _smooth_field(rng, shape, 3)
    image += rng.normal(0, rng.uniform(10, 22), size=shape).astype(np.float32)
    image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    origin = tuple(-(n - 1) / 2 * s for n, s in zip(shape[::-1], spacing))
    return PhantomCase(image, label, tuple(float(s) for s in spacing), tuple(float(o) for o in origin))


def write_sitk_atomic(image, path: str) -> None:
    """Write next to the target, then rename, so a crash never leaves a half-written file."""
    import SimpleITK as sitk

    folder, name = os.path.split(os.path.abspath(path))
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, useCompression=True)
        _make_readable(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _make_readable(path: str) -> None:
    """mkstemp creates files as 0600; give them the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json_atomic(data, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2)
        _make_readable(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of a dataset made with `seed`; cases stay the same when N grows."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_dataset(out_dir: str, cases: int, seed: int = 0, first_index: int = 0,
                  spacing: tuple[float, float, float] | None = None) -> list[str]:
    """Write `cases` phantom cases as imagesTr/case_XXX_0000.nii.gz, labelsTr/case_XXX.nii.gz, dataset.json."""
    if cases < 1:
        raise InputError(f"--cases must be at least 1, got {cases}.", "Ask for one or more cases.")
    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labelsTr"), exist_ok=True)
    names = []
    for index in range(first_index, first_index + cases):
        name = f"case_{index:03d}"
        image, label = make_case(case_seed(seed, index), spacing).to_sitk()
        write_sitk_atomic(image, os.path.join(out_dir, "imagesTr", f"{name}_0000.nii.gz"))
        write_sitk_atomic(label, os.path.join(out_dir, "labelsTr", f"{name}.nii.gz"))
        names.append(name)
    dataset = {
        "name": "UNetSegmentPhantom",
        "description": "Synthetic CT-like abdominal phantom (liver, spleen, kidneys); not patient data.",
        "reference": "UNetSegmentLib.phantom",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "channel_names": {"0": "CT"},
        "labels": {str(value): name for value, name in LABEL_NAMES.items()},
        "file_ending": ".nii.gz",
        "numTraining": len(names),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"} for name in names],
        "test": [],
    }
    write_json_atomic(dataset, os.path.join(out_dir, "dataset.json"))
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m UNetSegmentLib.phantom", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset folder to create (Decathlon layout)")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    names = write_dataset(args.out, args.cases, args.seed)
    print(f"wrote {len(names)} phantom cases to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
