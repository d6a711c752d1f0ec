"""Procedural stereo scenes with exact ground truth: our training source where SceneFlow is out of reach.

A scene is a textured background plane plus textured planar objects (ellipses and convex polygons).
Every surface is a plane in disparity, d(x, y) = a*x + b*y + c, written in left-image pixel
coordinates, and its texture is glued to those surface coordinates. Both views are rendered from
that one description by backward mapping: a left pixel (x, y) sees the surface point (x, y); a right
pixel (xr, y) sees the point with x - d(x, y) = xr, i.e. x = (xr + b*y + c) / (1 - a). A z-buffer
keeps the nearest surface (largest disparity). Hence right(x - d(x), y) == left(x, y) holds exactly
for every non-occluded left pixel, up to the bilinear texture lookup at sub-pixel positions.

Scene parameters and textures come from NumPy's generator seeded by (seed, index) on the CPU; the
rendering is torch, so the same code runs on "cpu" or "cuda".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..scene_range import TRAINED_RANGE_FRACTION
from .io import write_image_rgb, write_middlebury_calib, write_pfm
from .photo_stereo import PhotoStereoGenerator, skimage_photos
from .virtual_rig import random_disparity_plane, virtual_rig_calib

# scikit-image images that ship inside the wheel (no download); unavailable ones are skipped
PHOTO_NAMES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "text", "moon",
    "page", "coins", "hubble_deep_field", "immunohistochemistry", "clock", "cell", "colorwheel",
)  # never stereo_motorcycle: it is an evaluation pair
BACKGROUND_DISPARITY_FRACTION = 0.12  # background disparities lie in [1, this * the scene range]
TEXTURE_BLUR_SIGMA = 0.8  # band-limits textures so sub-pixel (bilinear) lookups stay accurate
OCCLUSION_TOLERANCE_PX = 1e-3
MIN_DISPARITY = 1.0


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """Photographs from skimage.data as float32 HxWx3, loaded once per process."""
    return tuple(photo.astype(np.float32) for photo in skimage_photos(PHOTO_NAMES))


# --------------------------------------------------------------------------- textures (NumPy, CPU)


def _value_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multi-octave value noise, HxWx3 in about [0, 1]."""
    noise = np.zeros((height, width, 3), np.float32)
    cell = rng.uniform(8, 64)
    amplitude, total = 1.0, 0.0
    for _ in range(int(rng.integers(2, 5))):
        grid = rng.random((int(height / cell) + 2, int(width / cell) + 2, 3), dtype=np.float32)
        noise += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        total += amplitude
        amplitude *= rng.uniform(0.4, 0.7)
        cell = max(cell / 2.0, 2.0)
    return noise / total


def _pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Stripes or a checkerboard at a random angle, HxWx3 in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(6, 48)
    if rng.random() < 0.5:
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    else:
        wave = (np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period) > 0).astype(np.float32)
    colours = rng.random((2, 3), dtype=np.float32)
    return colours[0] + wave[:, :, None] * (colours[1] - colours[0])


def _photo_crop(rng: np.random.Generator, height: int, width: int) -> np.ndarray | None:
    """A randomly scaled, flipped crop of a photograph, HxWx3 in [0, 1]."""
    photos = _photos()
    if not photos:
        return None
    photo = photos[int(rng.integers(len(photos)))]
    fit = max(height / photo.shape[0], width / photo.shape[1])
    scale = max(fit, rng.uniform(0.4, 1.5))
    # crop the source window first, then resize only that window
    window_h = min(photo.shape[0], math.ceil(height / scale))
    window_w = min(photo.shape[1], math.ceil(width / scale))
    top = int(rng.integers(photo.shape[0] - window_h + 1))
    left = int(rng.integers(photo.shape[1] - window_w + 1))
    window = photo[top:top + window_h, left:left + window_w]
    crop = cv2.resize(window, (width, height), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop / 255.0


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random texture, float32 3xHxW in [0, 255]: photo, noise or pattern, blended and recoloured."""
    kind = rng.random()
    photo = _photo_crop(rng, height, width) if kind < 0.6 else None
    if photo is None:
        base = _value_noise(rng, height, width) if rng.random() < 0.6 else _pattern(rng, height, width)
    else:
        base = photo
    if rng.random() < 0.35:  # mix in another layer so surfaces rarely look like clean photos
        layer = _value_noise(rng, height, width) if rng.random() < 0.7 else _pattern(rng, height, width)
        alpha = rng.uniform(0.15, 0.5)
        base = (1 - alpha) * base + alpha * layer
    grey = base.mean(axis=2, keepdims=True)
    saturation = rng.uniform(0.3, 1.4)
    base = grey + saturation * (base - grey)
    contrast = math.exp(rng.uniform(math.log(0.25), math.log(1.6)))
    gains = rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    mean = float(base.mean())
    texture = (base - mean) * contrast * gains + rng.uniform(0.2, 0.8)
    texture = cv2.GaussianBlur(np.clip(texture, 0, 1).astype(np.float32), (0, 0), TEXTURE_BLUR_SIGMA)
    return np.ascontiguousarray(texture.transpose(2, 0, 1) * 255.0)


# --------------------------------------------------------------------------- scene description


@dataclass
class _Surface:
    """A textured planar surface; d = slope_x * x + slope_y * y + offset in left-image pixels."""

    slope_x: float
    slope_y: float
    offset: float
    x_min: float  # bounding box of the surface in left-image (= surface) coordinates
    x_max: float
    y_min: float
    y_max: float
    texture: torch.Tensor  # (3, Ht, Wt); texel [i, j] sits at surface point (texture_x0 + j, texture_y0 + i)
    texture_x0: int
    texture_y0: int
    ellipse: tuple[float, float, float, float, float] | None = None  # cx, cy, rx, ry, angle
    polygon: np.ndarray | None = None  # (K, 2) convex vertices, counter-clockwise in (x, y-down) terms

    def inside(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.ellipse is not None:
            cx, cy, rx, ry, angle = self.ellipse
            dx, dy = x - cx, y - cy
            c, s = math.cos(angle), math.sin(angle)
            return ((c * dx + s * dy) / rx) ** 2 + ((-s * dx + c * dy) / ry) ** 2 <= 1.0
        if self.polygon is not None:
            inside = torch.ones_like(x, dtype=torch.bool)
            vertices = self.polygon
            for k in range(len(vertices)):
                x0, y0 = vertices[k]
                x1, y1 = vertices[(k + 1) % len(vertices)]
                inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
            return inside
        return torch.ones_like(x, dtype=torch.bool)

    def disparity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.slope_x * x + self.slope_y * y + self.offset

    def surface_x(self, x_right: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Surface (left-image) x of the point seen at right-image column x_right."""
        return (x_right + self.slope_y * y + self.offset) / (1.0 - self.slope_x)

    def right_columns(self) -> tuple[float, float]:
        """Range of right-image columns the surface's bounding box maps to."""
        corners = [
            x * (1 - self.slope_x) - self.slope_y * y - self.offset
            for x in (self.x_min, self.x_max)
            for y in (self.y_min, self.y_max)
        ]
        return min(corners), max(corners)

    def colour(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Texture at surface points (x, row) for image rows `rows`, (3, h, w) from x (h, w).

        Rows are whole pixels in both views (the rig is rectified), so the lookup interpolates along x only.
        """
        texture_rows = self.texture[:, rows.start - self.texture_y0:rows.stop - self.texture_y0]  # (3, h, Wt)
        u = (x - self.texture_x0).clamp(0, texture_rows.shape[2] - 1.001)
        u0 = u.floor()
        weight = u - u0
        index = u0.long().unsqueeze(0).expand(3, -1, -1)
        left_texel = torch.gather(texture_rows, 2, index)
        right_texel = torch.gather(texture_rows, 2, index + 1)
        return left_texel + weight * (right_texel - left_texel)


def _attach_texture(rng: np.random.Generator, x_min: float, x_max: float, y_min: float, y_max: float,
                    device: torch.device) -> tuple[torch.Tensor, int, int]:
    x0, y0 = math.floor(x_min) - 1, math.floor(y_min) - 1
    width, height = math.ceil(x_max) + 2 - x0, math.ceil(y_max) + 2 - y0
    texture = torch.from_numpy(_texture(rng, height, width)).to(device)
    return texture, x0, y0


# --------------------------------------------------------------------------- generator


class SyntheticStereoGenerator:
    """Random textured planar scenes with dense, exact disparity; `sample(i)` is deterministic per (seed, i)."""

    def __init__(
        self,
        height: int = 256,
        width: int = 512,
        max_disparity: int = 192,
        seed: int = 0,
        num_objects: tuple[int, int] = (4, 12),
        device: str | torch.device = "cpu",
    ) -> None:
        if num_objects[0] < 0 or num_objects[1] < num_objects[0]:
            raise ValueError(f"num_objects must be an ordered (low, high) pair, got {num_objects}")
        self.height, self.width = int(height), int(width)
        self.max_disparity = int(max_disparity)
        self.seed = int(seed)
        self.num_objects = num_objects
        self.device = torch.device(device)
        self.scene_max_disparity = TRAINED_RANGE_FRACTION * self.max_disparity
        if self.scene_max_disparity <= 2 * MIN_DISPARITY:
            raise ValueError(f"max_disparity {max_disparity} is too small for a scene")

    def _background(self, rng: np.random.Generator) -> _Surface:
        high = max(2 * MIN_DISPARITY, BACKGROUND_DISPARITY_FRACTION * self.scene_max_disparity)
        high = rng.uniform(MIN_DISPARITY + 1, high)
        # the right view sees background points up to x = width + disparity, so the plane spans that too
        x_min, x_max = -2.0, self.width + high + 2.0
        y_min, y_max = -2.0, self.height + 1.0
        centre = ((x_min + x_max) / 2, (y_min + y_max) / 2)
        half = ((x_max - x_min) / 2, (y_max - y_min) / 2)
        slope_x, slope_y, offset = random_disparity_plane(rng, centre, half, MIN_DISPARITY, high)
        texture, tx0, ty0 = _attach_texture(rng, x_min, x_max, y_min, y_max, self.device)
        return _Surface(slope_x, slope_y, offset, x_min, x_max, y_min, y_max, texture, tx0, ty0)

    def _object(self, rng: np.random.Generator, low: float) -> _Surface:
        height, width = self.height, self.width
        radius = math.exp(rng.uniform(math.log(0.04 * height), math.log(0.4 * height)))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        rx, ry = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
        cx, cy = rng.uniform(-0.1 * width, 1.1 * width), rng.uniform(-0.1 * height, 1.1 * height)
        angle = rng.uniform(0, math.pi)
        ellipse, polygon = None, None
        if rng.random() < 0.4:
            ellipse = (cx, cy, rx, ry, angle)
            c, s = math.cos(angle), math.sin(angle)
            half_x, half_y = math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)
            x_min, x_max, y_min, y_max = cx - half_x, cx + half_x, cy - half_y, cy + half_y
        else:
            if rng.random() < 0.5:  # rotated rectangle
                corner_angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
                radii = np.ones(4)
            else:  # convex hull of points around an ellipse
                count = int(rng.integers(3, 9))
                corner_angles = np.sort(rng.uniform(0, 2 * math.pi, count))
                radii = rng.uniform(0.6, 1.0, count)
            local = np.stack([rx * radii * np.cos(corner_angles), ry * radii * np.sin(corner_angles)], 1)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            points = (local @ rotation.T + [cx, cy]).astype(np.float32)
            hull = cv2.convexHull(points)[:, 0, :].astype(np.float64)
            signed_area = np.sum(hull[:, 0] * np.roll(hull[:, 1], -1) - np.roll(hull[:, 0], -1) * hull[:, 1])
            polygon = hull if signed_area > 0 else hull[::-1].copy()
            (x_min, y_min), (x_max, y_max) = polygon.min(0), polygon.max(0)
        centre = ((x_min + x_max) / 2, (y_min + y_max) / 2)
        half = ((x_max - x_min) / 2, (y_max - y_min) / 2)
        slope_x, slope_y, offset = random_disparity_plane(rng, centre, half, low, self.scene_max_disparity)
        texture, tx0, ty0 = _attach_texture(rng, x_min, x_max, y_min, y_max, self.device)
        return _Surface(slope_x, slope_y, offset, x_min, x_max, y_min, y_max, texture, tx0, ty0, ellipse, polygon)

    def scene(self, index: int) -> list[_Surface]:
        """The surfaces of scene `index`, background first."""
        rng = np.random.default_rng([self.seed, int(index)])
        background = self._background(rng)
        # objects stay in front of the background's whole disparity range
        background_far = max(
            background.slope_x * x + background.slope_y * y + background.offset
            for x in (background.x_min, background.x_max)
            for y in (background.y_min, background.y_max)
        )
        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        low = min(background_far, self.scene_max_disparity - 1)
        return [background] + [self._object(rng, low) for _ in range(count)]

    def _rows(self, surface: _Surface) -> slice:
        return slice(max(0, math.floor(surface.y_min)), min(self.height, math.ceil(surface.y_max) + 1))

    def _render(self, surfaces: list[_Surface], right_view: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-buffered render of one view: colour (3, H, W) float in [0, 255], disparity (H, W)."""
        height, width, device = self.height, self.width, self.device
        colour = torch.zeros(3, height, width, device=device)
        depth = torch.full((height, width), -math.inf, device=device)  # disparity of the nearest surface so far
        for surface in surfaces:
            rows = self._rows(surface)
            low, high = surface.right_columns() if right_view else (surface.x_min, surface.x_max)
            cols = slice(max(0, math.floor(low)), min(width, math.ceil(high) + 1))
            if rows.start >= rows.stop or cols.start >= cols.stop:
                continue
            y = torch.arange(rows.start, rows.stop, device=device, dtype=torch.float32)[:, None]
            x = torch.arange(cols.start, cols.stop, device=device, dtype=torch.float32)[None, :]
            y, x = torch.broadcast_tensors(y, x)
            surface_x = surface.surface_x(x, y) if right_view else x
            disparity = surface.disparity(surface_x, y)
            visible = surface.inside(surface_x, y) & (disparity > depth[rows, cols])
            if not bool(visible.any()):
                continue
            depth[rows, cols] = torch.where(visible, disparity, depth[rows, cols])
            if right_view:
                texels = surface.colour(surface_x, rows)
            else:  # left pixels sit exactly on texels
                tx, ty = cols.start - surface.texture_x0, rows.start - surface.texture_y0
                texels = surface.texture[:, ty:ty + rows.stop - rows.start, tx:tx + cols.stop - cols.start]
            colour[:, rows, cols] = torch.where(visible, texels, colour[:, rows, cols])
        return colour, depth

    def _non_occluded(self, surfaces: list[_Surface], disparity: torch.Tensor) -> torch.Tensor:
        """Left pixels whose surface point is inside the right image and not hidden there, (H, W) bool."""
        height, width, device = self.height, self.width, self.device
        y = torch.arange(height, device=device, dtype=torch.float32)[:, None].expand(height, width)
        x_right = torch.arange(width, device=device, dtype=torch.float32)[None, :] - disparity
        visible = (x_right >= 0) & (x_right <= width - 1)
        for surface in surfaces:
            rows = self._rows(surface)
            if rows.start >= rows.stop:
                continue
            x_r, y_r = x_right[rows], y[rows]
            surface_x = surface.surface_x(x_r, y_r)
            hides = surface.inside(surface_x, y_r) & (
                surface.disparity(surface_x, y_r) > disparity[rows] + OCCLUSION_TOLERANCE_PX
            )
            visible[rows] &= ~hides
        return visible

    def calib(self) -> dict:
        return virtual_rig_calib(self.width, self.height, self.max_disparity)

    def sample(self, index: int) -> dict:
        """Sample dict: left/right uint8 HxWx3 RGB, disparity float32 HxW (dense), nocc bool HxW, name, calib."""
        surfaces = self.scene(index)
        left, disparity = self._render(surfaces, right_view=False)
        right, _ = self._render(surfaces, right_view=True)
        nocc = self._non_occluded(surfaces, disparity)

        def to_image(colour: torch.Tensor) -> np.ndarray:
            return colour.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()

        return {
            "left": to_image(left),
            "right": to_image(right),
            "disparity": disparity.cpu().numpy().astype(np.float32),
            "nocc": nocc.cpu().numpy(),
            "name": f"synthetic_{self.seed}_{int(index):06d}",
            "calib": self.calib(),
        }


GENERATOR_KINDS = ("photo", "planes")


class SyntheticStereoDataset(Dataset):
    """`n` generator samples as a Dataset of sample dicts.

    kind "photo" (default; the test split): pairs synthesised from real photographs
    (`photo_stereo.PhotoStereoGenerator`, which takes `textures`, `builtin_photos` and `gloss_prob`);
    "planes": the procedural textured planes of this module.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        height: int = 256,
        width: int = 512,
        max_disparity: int = 192,
        device: str | torch.device = "cpu",
        kind: str = "photo",
        textures: str | os.PathLike | list | None = None,
        builtin_photos: bool = True,
        gloss_prob: float = 0.0,
    ) -> None:
        self.n = int(n)
        if kind == "photo":
            self.generator = PhotoStereoGenerator(height, width, max_disparity, seed=seed, textures=textures,
                                                  builtin_photos=builtin_photos, gloss_prob=gloss_prob)
        elif kind == "planes":
            if textures is not None or gloss_prob:
                raise ValueError("textures and gloss_prob apply to kind 'photo' only")
            self.generator = SyntheticStereoGenerator(height, width, max_disparity, seed=seed, device=device)
        else:
            raise ValueError(f"unknown synthetic kind {kind!r}; known: {GENERATOR_KINDS}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.generator.sample(index)


def write_middlebury_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    height: int = 256,
    width: int = 512,
    max_disparity: int = 192,
    kind: str = "photo",
    textures: str | os.PathLike | list | None = None,
    builtin_photos: bool = True,
) -> list[str]:
    """Write `n` generated pairs in Middlebury layout; returns the CASE directories.

    Each CASE holds im0.png, im1.png, disp0GT.pfm (+inf = no ground truth), mask0nocc.png
    (255 = non-occluded, 128 = occluded) and calib.txt.
    """
    dataset = SyntheticStereoDataset(n, seed, height, width, max_disparity, kind=kind, textures=textures,
                                     builtin_photos=builtin_photos)
    out_dir = Path(out_dir)
    cases = []
    for index in range(int(n)):
        sample = dataset[index]
        case = out_dir / sample["name"]
        case.mkdir(parents=True, exist_ok=True)
        write_image_rgb(case / "im0.png", sample["left"])
        write_image_rgb(case / "im1.png", sample["right"])
        write_pfm(case / "disp0GT.pfm", np.where(np.isfinite(sample["disparity"]), sample["disparity"], np.inf))
        cv2.imwrite(str(case / "mask0nocc.png"), np.where(sample["nocc"], 255, 128).astype(np.uint8))
        calib = sample["calib"]
        write_middlebury_calib(
            case / "calib.txt", focal_px=calib["cam0"][0, 0], cx0=calib["cam0"][0, 2], cx1=calib["cam1"][0, 2],
            cy=calib["cam0"][1, 2], baseline_mm=calib["baseline"], width=width, height=height, ndisp=max_disparity,
        )
        cases.append(str(case))
    return cases
