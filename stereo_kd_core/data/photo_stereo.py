"""Stereo pairs synthesised from real photographs, with exact ground truth.

The procedural planes of `synthetic.py` teach geometry but not the look of real images; a network
trained on real data (psmnet) fails on them, and students trained on them fail on real pairs. This
generator keeps real image statistics everywhere: every surface is textured with a crop of a real
photograph (or, for textureless surfaces, a flat shaded colour), and the scene layout follows what
real scenes look like:

* a background that is the visible part of a convex piecewise-planar "room" seen from inside
  (back plane, optional floor, side walls, ceiling): in a rectified rig every 3D plane is affine in
  disparity, d = a*x + b*y + c, and from inside a convex room the visible plane along a ray is the
  nearest one, i.e. the background disparity is the *maximum* of the planes' affine fields. This
  gives ground planes receding to a horizon, walls, corners, and scenes that are near everywhere;
* 10-40 foreground layers with a power-law size distribution: regions grown from a photograph
  (boundaries follow real colour edges), ellipses, polygons and thin bars, each a slanted plane
  with optional curvature, textured by photographs or flat shaded colour.

Both views come from one description. The left view samples every layer at integer pixels; the
right view is rendered by forward rasterisation of each layer's rows: the segment between two
horizontally adjacent left pixels of a layer maps to [x - d(x), x + 1 - d(x + 1)] in the right
image, and the right pixels inside it take the linearly interpolated colour and disparity
(sub-pixel exact, no nearest-pixel rounding). A z-buffer on disparity keeps the nearest surface;
the rare uncovered right pixels are inpainted. Camera effects (blur, gamma, gain, noise, JPEG)
are applied per view, with photometric asymmetry between the views.

Optional glossy surfaces (`gloss_prob`): a layer may carry a mirror-like reflection, a photograph
(sometimes blurred, sometimes with a specular highlight) blended over its colour, that lies at a
virtual disparity between 0 and the surface's own: the reflection moves between the views by that
disparity, not the surface's, while the ground truth stays the surface's. Real scenes are full of
them (car bodies and windows, polished floors); without them a network trusts the reflection.

Texture pool: the photographs that ship inside scikit-image (never the Motorcycle pair, an
evaluation scene) and/or folders of images (`textures`), e.g. Debian's wallpaper packages.
The fixed test split (seed 2026) uses the scikit-image photographs only, so it is the same on
every machine; training recipes use a folder pool so that no test photograph is trained on.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ..scene_range import TRAINED_RANGE_FRACTION
from .virtual_rig import random_disparity_plane, virtual_rig_calib

# scikit-image photographs that ship inside the wheel, of scenes only (stereo_motorcycle is an
# evaluation pair and must never be a texture). Left out: text, page, grass, brick and coins (one repetitive pattern
# over the whole frame is ambiguous for any two-view matcher and is not a scene), hubble_deep_field
# and moon (mostly black), cell, immunohistochemistry and retina (microscopy and fundus images),
# colorwheel (synthetic), and images that need a download (pooch).
BUILTIN_PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "gravel", "clock")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
MAX_PHOTO_SIDE = 1600  # photographs are stored downscaled to this (memory: ~7 MB each)
MIN_PHOTO_SIDE = 96
MAX_PLANE_SLOPE = 0.35  # |dd/dx| of a foreground layer; keeps right-view segments well ordered
MIN_DISPARITY = 0.5
OCCLUSION_TOLERANCE_PX = 0.5
# A background crop whose mean absolute grey gradient (grey levels per pixel) is below this is
# redrawn (a few tries): real scenes are textured almost everywhere; textureless regions come from
# the foreground layers.
MIN_BACKGROUND_GRADIENT = 3.0
BACKGROUND_TRIES = 6
GLOSS_BACKGROUND_FACTOR = 0.25  # the background (a whole wall or floor) is glossy less often
GLOSS_ALPHA = (0.2, 0.7)  # the reflection's share of a glossy pixel's colour


# --------------------------------------------------------------------------- texture pool


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray | None:
    image = np.asarray(image)
    if image.dtype != np.uint8 or min(image.shape[:2]) < MIN_PHOTO_SIDE:
        return None
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    scale = MAX_PHOTO_SIDE / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


@lru_cache(maxsize=4)
def skimage_photos(names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """scikit-image's photographs `names` (they ship inside its wheel) as uint8 HxWx3 RGB, loaded
    once per process; unavailable or non-8-bit ones are skipped."""
    import skimage.data

    photos = []
    for name in names:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a missing optional image only shrinks the pool
            continue
        image = _to_rgb_uint8(image)
        if image is not None:
            photos.append(image)
    return tuple(photos)


def builtin_photos() -> tuple[np.ndarray, ...]:
    """scikit-image's photographs as uint8 HxWx3 RGB (never the Motorcycle evaluation pair)."""
    return skimage_photos(BUILTIN_PHOTO_NAMES)


def list_texture_files(folder: str | os.PathLike) -> list[Path]:
    """Image files below `folder`, one per wallpaper: screenshots and the smaller renditions of a
    multi-resolution wallpaper package (`NAME/contents/images/WxH.ext`) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"texture folder {folder} does not exist")
    best: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if "screenshot" in path.name.lower() or "motorcycle" in path.name.lower():
            continue
        parts = path.parts
        group = str(Path(*parts[:parts.index("contents")])) if "contents" in parts else str(path)
        if "images_dark" in parts:
            group += "/dark"
        if group not in best or path.stat().st_size > best[group].stat().st_size:
            best[group] = path
    return sorted(best.values())


@lru_cache(maxsize=4)
def folder_photos(folder: str) -> tuple[np.ndarray, ...]:
    """The photographs of a texture folder as uint8 HxWx3 RGB, loaded once per process."""
    photos = []
    for path in list_texture_files(folder):
        flag = cv2.IMREAD_COLOR
        if path.stat().st_size > 4_000_000:  # decode big wallpapers at reduced size: much faster
            flag = cv2.IMREAD_REDUCED_COLOR_2
        image = cv2.imread(str(path), flag)
        if image is None:
            continue
        image = _to_rgb_uint8(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if image is not None:
            photos.append(image)
    if not photos:
        raise FileNotFoundError(f"no readable images in texture folder {folder}")
    return tuple(photos)


def photo_pool(textures: str | os.PathLike | list | tuple | None, builtin: bool) -> tuple[np.ndarray, ...]:
    """The texture pool: folder photographs plus, if `builtin`, scikit-image's."""
    folders = [] if textures is None else [textures] if isinstance(textures, (str, os.PathLike)) else list(textures)
    pool: list[np.ndarray] = []
    for folder in folders:
        pool.extend(folder_photos(str(Path(folder).resolve())))
    if builtin:
        pool.extend(builtin_photos())
    if not pool:
        raise ValueError("empty texture pool: give a textures folder or allow the built-in photographs")
    return tuple(pool)


# --------------------------------------------------------------------------- layers


class _Layer:
    """A surface on the left-image grid: rows y0.., columns x0.. (may extend past the image)."""

    __slots__ = ("y0", "x0", "colour", "disparity", "mask")

    def __init__(self, y0: int, x0: int, colour: np.ndarray, disparity: np.ndarray, mask: np.ndarray) -> None:
        self.y0, self.x0 = y0, x0
        self.colour = colour  # (h, w, 3) float32 in [0, 255]
        self.disparity = disparity  # (h, w) float32
        self.mask = mask  # (h, w) bool


def _photo_crop(rng: np.random.Generator, photos: tuple[np.ndarray, ...], height: int, width: int) -> np.ndarray:
    """A crop of a random photograph resampled to (height, width), float32 HxWx3 in [0, 255].

    The window covers 0.7-3 times the output size in photo pixels (capped by the photo), so textures
    range from magnified (smooth) to minified (fine detail)."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    zoom = math.exp(rng.uniform(math.log(0.7), math.log(3.0)))
    fit = min(ph / height, pw / width)
    zoom = min(zoom, fit)
    wh, ww = max(2, int(round(height * zoom))), max(2, int(round(width * zoom)))
    top, left = int(rng.integers(ph - wh + 1)), int(rng.integers(pw - ww + 1))
    window = photo[top:top + wh, left:left + ww]
    if rng.random() < 0.5:
        window = window[:, ::-1]
    interpolation = cv2.INTER_AREA if zoom > 1 else cv2.INTER_LINEAR
    crop = cv2.resize(np.ascontiguousarray(window), (width, height), interpolation=interpolation)
    return crop.astype(np.float32)


def _shaded_colour(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textureless surface: one colour under smooth shading (a linear and a radial term)."""
    colour = rng.uniform(20, 235, size=3).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gx, gy = rng.uniform(-0.4, 0.4, size=2) / max(height, width)
    shade = 1 + gx * (x - width / 2) + gy * (y - height / 2)
    if rng.random() < 0.5:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = max(height, width) * rng.uniform(0.5, 2)
        shade = shade + rng.uniform(-0.3, 0.3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / radius ** 2)
    return np.clip(shade[:, :, None] * colour, 0, 255).astype(np.float32)


def _surface_texture(rng: np.random.Generator, photos: tuple[np.ndarray, ...], height: int, width: int,
                     textureless_prob: float) -> np.ndarray:
    if rng.random() < textureless_prob:
        return _shaded_colour(rng, height, width)
    texture = _photo_crop(rng, photos, height, width)
    if rng.random() < 0.3:  # recolour: real objects are not all the colours of a wallpaper
        grey = texture.mean(axis=2, keepdims=True)
        texture = grey + rng.uniform(0.3, 1.3) * (texture - grey)
        texture = texture * rng.uniform(0.7, 1.3, size=3).astype(np.float32)
    return np.clip(texture, 0, 255).astype(np.float32)


# --------------------------------------------------------------------------- generator


class PhotoStereoGenerator:
    """Stereo pairs from real photographs with dense exact disparity; `sample(i)` is deterministic per (seed, i).

    `textures`: a folder (or list of folders) of photographs; `builtin_photos`: add scikit-image's.
    """

    def __init__(self, height: int = 256, width: int = 512, max_disparity: int = 192, seed: int = 0,
                 textures: str | os.PathLike | list | None = None, builtin_photos: bool = True,
                 num_objects: tuple[int, int] = (10, 40), textureless_prob: float = 0.15,
                 camera_effects: bool = True, gloss_prob: float = 0.0) -> None:
        if num_objects[0] < 0 or num_objects[1] < num_objects[0]:
            raise ValueError(f"num_objects must be an ordered (low, high) pair, got {num_objects}")
        if not 0.0 <= gloss_prob <= 1.0:
            raise ValueError(f"gloss_prob must be in [0, 1], got {gloss_prob}")
        self.gloss_prob = float(gloss_prob)
        self.height, self.width = int(height), int(width)
        self.max_disparity = int(max_disparity)
        self.seed = int(seed)
        self.textures = textures
        self.builtin_photos = bool(builtin_photos)
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))
        self.textureless_prob = float(textureless_prob)
        self.camera_effects = bool(camera_effects)
        self.scene_max_disparity = TRAINED_RANGE_FRACTION * self.max_disparity
        if self.scene_max_disparity <= 4 * MIN_DISPARITY:
            raise ValueError(f"max_disparity {max_disparity} is too small for a scene")

    @property
    def photos(self) -> tuple[np.ndarray, ...]:
        return photo_pool(self.textures, self.builtin_photos)

    # -- scene

    def _background(self, rng: np.random.Generator) -> _Layer:
        """Max of affine planes (a convex room seen from inside), over x in [-2, W + d_max + 2)."""
        height, width, d_max = self.height, self.width, self.scene_max_disparity
        pad = int(math.ceil(d_max)) + 4
        x0, y0 = -2, 0
        w = width + pad
        y, x = np.mgrid[0:height, x0:x0 + w].astype(np.float32)
        # back plane: anywhere from far to near (whole scene near happens: Motorcycle is 9-63 px)
        d_back = math.exp(rng.uniform(math.log(MIN_DISPARITY), math.log(0.75 * d_max)))
        span = rng.uniform(0, 0.5) * d_back
        a, b, c = random_disparity_plane(rng, (width / 2, height / 2), (width / 2, height / 2),
                                         max(MIN_DISPARITY, d_back - span), d_back + span, max_slope=0.3)
        planes = [a * x + b * y + c]
        if rng.random() < 0.6:  # ground plane: disparity linear in the row below a horizon, with roll
            horizon = rng.uniform(-0.3, 0.7) * height
            near = rng.uniform(0.15, 0.75) * d_max
            rate = max(near - 0.0, 1.0) / max(height - horizon, 1.0)
            roll = rng.uniform(-0.15, 0.15)
            planes.append(rate * (y - horizon + roll * (x - width / 2)))
        for side in (-1, 1):  # side walls: disparity grows towards the image edge
            if rng.random() < 0.3:
                edge = width / 2 + side * rng.uniform(0.1, 0.6) * width
                rate = rng.uniform(0.05, 0.6)
                planes.append(rate * side * (x - edge) + d_back * rng.uniform(0.5, 1.0))
        if rng.random() < 0.15:  # ceiling
            line = rng.uniform(0.0, 0.4) * height
            planes.append(rng.uniform(0.05, 0.4) * (line - y) + d_back * rng.uniform(0.5, 1.0))
        stack = np.stack(planes)  # (P, h, w)
        which = stack.argmax(0)
        disparity = np.clip(stack.max(0), MIN_DISPARITY, d_max)
        if rng.random() < 0.3:  # gently uneven terrain / curved surfaces
            bumps = cv2.resize(rng.standard_normal((4, 8)).astype(np.float32), (w, height),
                               interpolation=cv2.INTER_CUBIC)
            disparity = np.clip(disparity * (1 + rng.uniform(0.02, 0.08) * bumps), MIN_DISPARITY, d_max)
        colour = np.empty((height, w, 3), np.float32)
        textures = [self._background_texture(rng, height, w) for _ in range(len(planes))]
        same = rng.random() < 0.4  # one photograph over all planes, or one per plane
        for index, texture in enumerate(textures):
            region = which == index
            colour[region] = textures[0][region] if same else texture[region]
        return _Layer(y0, x0, colour, disparity.astype(np.float32), np.ones((height, w), bool))

    def _background_texture(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        for _ in range(BACKGROUND_TRIES):
            texture = self._texture(rng, height, width, 0.0)
            grey = texture.mean(axis=2)
            gradient = np.abs(np.diff(grey, axis=1)).mean() + np.abs(np.diff(grey, axis=0)).mean()
            if gradient >= MIN_BACKGROUND_GRADIENT:
                break
        return texture

    def _texture(self, rng: np.random.Generator, height: int, width: int, textureless_prob: float) -> np.ndarray:
        return _surface_texture(rng, self.photos, height, width, textureless_prob)

    def _object_mask(self, rng: np.random.Generator, kind: str, h: int, w: int, texture: np.ndarray) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        if kind == "thin":
            angle = rng.uniform(0, math.pi)
            thickness = rng.uniform(0.8, 4.0)
            distance = np.abs(-(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle))
            along = np.abs((x - cx) * math.cos(angle) + (y - cy) * math.sin(angle))
            return (distance <= thickness / 2) & (along <= max(h, w) / 2)
        ellipse = ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1
        if kind == "ellipse":
            return ellipse
        if kind == "polygon":
            count = int(rng.integers(3, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, count))
            radii = rng.uniform(0.5, 1.0, count)
            points = np.stack([cx + radii * (w / 2) * np.cos(angles), cy + radii * (h / 2) * np.sin(angles)], 1)
            mask = np.zeros((h, w), np.uint8)
            cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
            return mask.astype(bool)
        # "region": grow a region of similar colour from the centre of the texture, so the object's
        # outline follows real image edges; bounded by the ellipse
        smooth = cv2.GaussianBlur(texture, (0, 0), 1.5).astype(np.uint8)
        flood = np.zeros((h + 2, w + 2), np.uint8)
        tolerance = float(rng.uniform(8, 30))
        seed_point = (int(cx), int(cy))
        cv2.floodFill(smooth.copy(), flood, seed_point, (0, 0, 0), (tolerance,) * 3, (tolerance,) * 3,
                      4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
        mask = flood[1:-1, 1:-1].astype(bool) & ellipse
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)).astype(bool)
        if mask.sum() < 0.15 * ellipse.sum():  # a tiny flood: fall back to the ellipse
            return ellipse
        return mask

    def _object(self, rng: np.random.Generator, background: _Layer) -> _Layer | None:
        height, width, d_max = self.height, self.width, self.scene_max_disparity
        # power-law radius: many small objects, few large ones (pdf ~ r^-2 on [3 px, 0.45 H])
        r_min, r_max = 3.0, max(4.0, 0.45 * height)
        radius = 1.0 / (1.0 / r_min - rng.random() * (1.0 / r_min - 1.0 / r_max))
        kind = rng.choice(["region", "ellipse", "polygon", "thin"], p=[0.45, 0.2, 0.25, 0.1])
        aspect = math.exp(rng.uniform(math.log(0.4), math.log(2.5)))
        if kind == "thin":
            radius = max(radius, rng.uniform(0.05, 0.3) * width)
            aspect = 1.0
        h = max(3, int(round(2 * radius / math.sqrt(aspect))))
        w = max(3, int(round(2 * radius * math.sqrt(aspect))))
        cy = rng.uniform(-0.1, 1.1) * height
        cx = rng.uniform(-0.1, 1.0) * width + rng.uniform(0, d_max)
        y0, x0 = int(round(cy - h / 2)), int(round(cx - w / 2))
        texture = self._texture(rng, h, w, self.textureless_prob)
        mask = self._object_mask(rng, kind, h, w, texture)
        # in front of the background at the object's centre, anywhere up to the nearest disparity
        by = min(max(int(cy), 0), height - 1)
        bx = min(max(int(cx) - background.x0, 0), background.disparity.shape[1] - 1)
        behind = float(background.disparity[by, bx])
        if behind + 1.0 >= d_max:
            return None
        # most objects stand near what is behind them (clutter), fewer float close to the camera
        high = behind + 1.0 + (d_max - behind - 1.0) * rng.random() ** 2
        yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
        a, b, c = random_disparity_plane(rng, (cx, cy), (w / 2, h / 2), behind + 1.0, high,
                                         max_slope=MAX_PLANE_SLOPE)
        disparity = a * xx + b * yy + c
        if rng.random() < 0.3:  # curved: a dome or a bowl, staying within range
            bulge = rng.uniform(-0.15, 0.15) * min(radius, d_max)
            disparity = disparity + bulge * (1 - ((xx - cx) / (w / 2)) ** 2 - ((yy - cy) / (h / 2)) ** 2).clip(0)
        disparity = np.clip(disparity, MIN_DISPARITY, d_max).astype(np.float32)
        return _Layer(y0, x0, texture, disparity, mask)

    def layers(self, index: int) -> list[_Layer]:
        rng = np.random.default_rng([self.seed, int(index)])
        background = self._background(rng)
        count = int(rng.integers(self.num_objects[0], self.num_objects[1] + 1))
        objects = [self._object(rng, background) for _ in range(count)]
        return [background] + [layer for layer in objects if layer is not None]

    # -- rendering

    def _render_left(self, layers: list[_Layer], with_ids: bool = False) -> tuple[np.ndarray, ...]:
        """Colour and disparity of the left view (and, `with_ids`, the index of each pixel's layer)."""
        height, width = self.height, self.width
        colour = np.zeros((height, width, 3), np.float32)
        depth = np.full((height, width), -np.inf, np.float32)
        ids = np.full((height, width), -1, np.int32)
        for index, layer in enumerate(layers):
            h, w = layer.mask.shape
            ys, xs = max(layer.y0, 0), max(layer.x0, 0)
            ye, xe = min(layer.y0 + h, height), min(layer.x0 + w, width)
            if ys >= ye or xs >= xe:
                continue
            window = (slice(ys - layer.y0, ye - layer.y0), slice(xs - layer.x0, xe - layer.x0))
            disparity = layer.disparity[window]
            wins = layer.mask[window] & (disparity > depth[ys:ye, xs:xe])
            depth[ys:ye, xs:xe][wins] = disparity[wins]
            colour[ys:ye, xs:xe][wins] = layer.colour[window][wins]
            ids[ys:ye, xs:xe][wins] = index
        return (colour, depth, ids) if with_ids else (colour, depth)

    def _right_fragments(self, layer: _Layer) -> tuple[np.ndarray, ...] | None:
        """Right-view fragments of a layer: flat pixel index, disparity, colour (N, 3)."""
        height, width = self.height, self.width
        h, w = layer.mask.shape
        ys, ye = max(layer.y0, 0), min(layer.y0 + h, height)
        if ys >= ye:
            return None
        rows = slice(ys - layer.y0, ye - layer.y0)
        mask, disparity, colour = layer.mask[rows], layer.disparity[rows], layer.colour[rows]
        x = np.arange(layer.x0, layer.x0 + w, dtype=np.float32)[None, :]
        u = x - disparity  # right-image position of each left sample
        row_index = np.arange(ys, ye)[:, None]
        # segments: between adjacent samples of the layer (interpolated), plus half-pixel caps at
        # the layer's left and right borders so one-pixel-wide structures stay visible
        both = mask[:, :-1] & mask[:, 1:]
        starts, ends = u[:, :-1], u[:, 1:]
        c0, c1 = colour[:, :-1], colour[:, 1:]
        d0, d1 = disparity[:, :-1], disparity[:, 1:]
        left_cap = mask & ~np.pad(mask[:, :-1], ((0, 0), (1, 0)))
        right_cap = mask & ~np.pad(mask[:, 1:], ((0, 0), (0, 1)))
        pieces = [(both, starts, ends, c0, c1, d0, d1),
                  (left_cap, u - 0.5, u, colour, colour, disparity, disparity),
                  (right_cap, u, u + 0.5, colour, colour, disparity, disparity)]
        flat, depth, rgb = [], [], []
        for keep, s, e, ca, cb, da, db in pieces:
            rr, cc = np.nonzero(keep & (e > s))
            if rr.size == 0:
                continue
            s, e = s[rr, cc], e[rr, cc]
            ca, cb, da, db = ca[rr, cc], cb[rr, cc], da[rr, cc], db[rr, cc]
            base = np.ceil(s)
            for step in range(int(np.ceil((e - s).max())) + 1):
                xr = base + step
                inside = (xr <= e) & (xr >= 0) & (xr <= width - 1)
                if not inside.any():
                    continue
                t = ((xr - s) / np.maximum(e - s, 1e-6))[inside]
                flat.append(row_index[rr[inside], 0] * width + xr[inside].astype(np.int64))
                depth.append(da[inside] + t * (db[inside] - da[inside]))
                rgb.append(ca[inside] + t[:, None] * (cb[inside] - ca[inside]))
        if not flat:
            return None
        return np.concatenate(flat), np.concatenate(depth), np.concatenate(rgb)

    def _render_right(self, layers: list[_Layer], with_ids: bool = False) -> tuple[np.ndarray, ...]:
        """Colour and z-buffer (disparity) of the right view (and, `with_ids`, each pixel's layer
        index, -1 where nothing landed)."""
        height, width = self.height, self.width
        fragments = [(index, f) for index, f in enumerate(self._right_fragments(layer) for layer in layers)
                     if f is not None]
        flat = np.concatenate([f[0] for _, f in fragments])
        depth = np.concatenate([f[1] for _, f in fragments])
        rgb = np.concatenate([f[2] for _, f in fragments])
        order = np.lexsort((-depth, flat))  # by pixel, nearest (largest disparity) first
        flat, depth, rgb = flat[order], depth[order], rgb[order]
        first = np.ones(flat.size, bool)
        first[1:] = flat[1:] != flat[:-1]
        colour = np.zeros((height * width, 3), np.float32)
        zbuffer = np.full(height * width, -np.inf, np.float32)
        colour[flat[first]] = rgb[first]
        zbuffer[flat[first]] = depth[first]
        colour, zbuffer = colour.reshape(height, width, 3), zbuffer.reshape(height, width)
        holes = ~np.isfinite(zbuffer)
        if holes.any():
            colour = cv2.inpaint(np.clip(colour, 0, 255).astype(np.uint8), holes.astype(np.uint8), 3,
                                 cv2.INPAINT_TELEA).astype(np.float32)
        if not with_ids:
            return colour, zbuffer
        layer_of = np.concatenate([np.full(f[0].size, index, np.int32) for index, f in fragments])[order]
        ids = np.full(height * width, -1, np.int32)
        ids[flat[first]] = layer_of[first]
        return colour, zbuffer, ids.reshape(height, width)

    def _gloss(self, rng: np.random.Generator, layers: list[_Layer], left: np.ndarray, right: np.ndarray,
               left_ids: np.ndarray, right_ids: np.ndarray) -> None:
        """Blend mirror-like reflections over glossy layers, in place: a photograph at a virtual
        disparity d_ref in [0, the layer's median disparity] (a reflected scene lies behind the
        mirror), seen at column x in the left view and at x + d_ref in the right view's texture
        coordinates, so it shifts by d_ref between the views while the surface shifts by its own."""
        height, width = self.height, self.width
        margin = int(math.ceil(self.scene_max_disparity)) + 2
        for index, layer in enumerate(layers):
            chance = self.gloss_prob * (GLOSS_BACKGROUND_FACTOR if index == 0 else 1.0)
            if rng.random() >= chance:
                continue
            in_left, in_right = left_ids == index, right_ids == index
            if not in_left.any():
                continue
            alpha = rng.uniform(*GLOSS_ALPHA)
            d_ref = rng.uniform(0.0, 1.0) * float(np.median(layer.disparity[layer.mask]))
            reflection = _photo_crop(rng, self.photos, height, width + margin)
            if rng.random() < 0.5:  # out of focus: the mirror image lies at another depth
                reflection = cv2.GaussianBlur(reflection, (0, 0), rng.uniform(0.5, 3.0))
            if rng.random() < 0.5:  # a specular highlight: a light source reflected
                cy, cx = rng.uniform(0, height), rng.uniform(0, width + margin)
                radius = rng.uniform(3.0, 30.0)
                yy, xx = np.mgrid[0:height, 0:width + margin].astype(np.float32)
                reflection = reflection + 400.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / radius ** 2)[..., None]
            whole, frac = int(d_ref), np.float32(d_ref - int(d_ref))
            seen_left = reflection[:, :width]
            seen_right = ((1 - frac) * reflection[:, whole:whole + width]
                          + frac * reflection[:, whole + 1:whole + 1 + width])
            left[in_left] = (1 - alpha) * left[in_left] + alpha * seen_left[in_left]
            right[in_right] = (1 - alpha) * right[in_right] + alpha * seen_right[in_right]

    def _non_occluded(self, disparity: np.ndarray, right_depth: np.ndarray) -> np.ndarray:
        """Left pixels whose point lands inside the right image and is the nearest surface there."""
        height, width = self.height, self.width
        u = np.arange(width, dtype=np.float32)[None, :] - disparity
        visible = (u >= 0) & (u <= width - 1)
        rows = np.arange(height)[:, None]
        for column in (np.floor(u), np.ceil(u)):
            column = np.clip(column, 0, width - 1).astype(np.int64)
            visible &= right_depth[rows, column] <= disparity + OCCLUSION_TOLERANCE_PX
        return visible

    def _camera(self, rng: np.random.Generator, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lens blur, response curve, exposure asymmetry, sensor noise and compression, per view."""
        if not self.camera_effects:
            return np.clip(left, 0, 255).round().astype(np.uint8), np.clip(right, 0, 255).round().astype(np.uint8)
        sigma = rng.uniform(0.0, 1.0)
        gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
        quality = int(rng.integers(50, 96)) if rng.random() < 0.3 else None
        noise = rng.uniform(0.0, 4.0)
        views = []
        for view, image in enumerate((left, right)):
            if sigma > 0.3:
                image = cv2.GaussianBlur(image, (0, 0), sigma * (1 + 0.2 * rng.standard_normal() * view))
            image = 255.0 * (np.clip(image, 0, 255) / 255.0) ** gamma
            if view == 1 and rng.random() < 0.6:  # the second camera's exposure and white balance
                gains = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3)
                image = image * gains.astype(np.float32) + rng.uniform(-10, 10)
            image = image + rng.normal(0, noise, image.shape).astype(np.float32)
            image = np.clip(image, 0, 255).round().astype(np.uint8)
            if quality is not None:
                ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                image = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
            views.append(image)
        return views[0], views[1]

    def sample(self, index: int) -> dict:
        """Sample dict: left/right uint8 HxWx3 RGB, disparity float32 HxW (dense), nocc bool HxW, name, calib."""
        layers = self.layers(index)
        glossy = self.gloss_prob > 0
        left, disparity, *left_ids = self._render_left(layers, with_ids=glossy)
        right, right_depth, *right_ids = self._render_right(layers, with_ids=glossy)
        nocc = self._non_occluded(disparity, right_depth)
        if glossy:  # its own random stream: the scene and camera draws stay those of gloss_prob 0
            self._gloss(np.random.default_rng([self.seed, int(index), 2]), layers, left, right,
                        left_ids[0], right_ids[0])
        rng = np.random.default_rng([self.seed, int(index), 1])
        left, right = self._camera(rng, left, right)
        return {
            "left": left,
            "right": right,
            "disparity": disparity.astype(np.float32),
            "nocc": nocc,
            "name": f"photo_{self.seed}_{int(index):06d}",
            "calib": virtual_rig_calib(self.width, self.height, self.max_disparity),
        }
