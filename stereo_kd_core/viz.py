"""Pictures and files for people: colourised disparity, result panels, animations, PLY point clouds."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def colorize_disparity(disparity: np.ndarray, max_disparity: float | None = None) -> np.ndarray:
    """float HxW disparity -> uint8 HxWx3 RGB (turbo colour map), NaN and inf -> black.

    Scaled linearly from 0 to `max_disparity` (default: the largest finite value).
    """
    disparity = np.asarray(disparity, dtype=np.float32)
    valid = np.isfinite(disparity)
    if max_disparity is None:
        max_disparity = float(disparity[valid].max()) if valid.any() else 1.0
    scale = 255.0 / max(float(max_disparity), 1e-6)
    levels = np.clip(np.where(valid, disparity, 0.0) * scale, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray | None = None) -> int:
    """Write the finite points of (..., 3) `xyz` (with (..., 3) uint8 `rgb`) as binary PLY.

    Returns the number of points written.
    """
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if rgb is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(int(keep.sum()), dtype=fields)
    vertices["x"], vertices["y"], vertices["z"] = xyz[keep].T
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {vertices.size}",
              "property float x", "property float y", "property float z"]
    if rgb is not None:
        colors = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)[keep]
        vertices["red"], vertices["green"], vertices["blue"] = colors.T
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(vertices.tobytes())
    return int(vertices.size)


CAPTION_PX = 28         # strip under each panel tile: a title, or the disparity scale bar
BACKGROUND_RGB = (24, 24, 24)
VIEW_YAW_DEG = 35.0     # point cloud seen from the side and above, so depth shows as shape
VIEW_PITCH_DEG = -20.0


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx3, uint8 or uint16 -> uint8 HxWx3."""
    image = np.asarray(image)
    if image.dtype == np.uint16:  # scaled by its peak (10/12/16-bit sensors alike)
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(int(image.max()), 1))
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image, dtype=np.uint8)


def _caption(width: int, text: str) -> np.ndarray:
    strip = np.full((CAPTION_PX, width, 3), BACKGROUND_RGB, dtype=np.uint8)
    cv2.putText(strip, text, (4, CAPTION_PX - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def disparity_scale_bar(width: int, max_disparity: float) -> np.ndarray:
    """uint8 (CAPTION_PX, width, 3): the colour ramp of colorize_disparity from 0 to max, labelled in pixels."""
    strip = np.full((CAPTION_PX, width, 3), BACKGROUND_RGB, dtype=np.uint8)
    ramp = np.linspace(0.0, max_disparity, width, dtype=np.float32)[None, :]  # (1, W)
    strip[2:12] = colorize_disparity(ramp, max_disparity=max_disparity)
    for fraction in (0.0, 0.5, 1.0):
        x = int(round(fraction * (width - 1)))
        strip[12:15, max(x - 1, 0): x + 1] = 255  # tick
        label = f"{fraction * max_disparity:.0f}" + (" px" if fraction == 1.0 else "")
        (text_w, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.38, 1)
        left = int(np.clip(x - text_w // 2, 0, max(width - text_w, 0)))
        cv2.putText(strip, label, (left, CAPTION_PX - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return strip


def render_points(points: np.ndarray, colors: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HxWx3 view of an organized cloud (H', W', 3; NaN invalid) from a viewpoint turned
    VIEW_YAW_DEG around and VIEW_PITCH_DEG over the cloud's median point; nearest point wins
    each pixel (z-buffer), 2x2 pixel splats coloured by `colors` (H', W', 3 uint8)."""
    canvas = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)
    xyz = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    keep = np.isfinite(xyz).all(axis=1)
    xyz, rgb = xyz[keep], np.asarray(colors, dtype=np.uint8).reshape(-1, 3)[keep]
    if len(xyz) == 0:
        return canvas
    centre = np.median(xyz, axis=0)
    distance = max(float(np.linalg.norm(centre)), 1e-6)
    yaw, pitch = np.radians(VIEW_YAW_DEG), np.radians(VIEW_PITCH_DEG)
    rotate_y = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rotate_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    view = (xyz - centre) @ (rotate_x @ rotate_y).T + np.array([0.0, 0.0, distance])  # (N, 3) camera frame
    front = view[:, 2] > 1e-3 * distance
    view, rgb = view[front], rgb[front]
    if len(view) == 0:
        return canvas
    ray_x, ray_y = view[:, 0] / view[:, 2], view[:, 1] / view[:, 2]
    spread = max(np.percentile(np.abs(ray_x), 98) / width, np.percentile(np.abs(ray_y), 98) / height, 1e-9)
    focal = 0.45 / spread  # the bulk of the cloud fills 90% of the view
    u = np.round(width / 2 + focal * ray_x).astype(np.int64)
    v = np.round(height / 2 + focal * ray_y).astype(np.int64)
    depth = view[:, 2]
    for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):
        uu, vv = u + du, v + dv
        inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
        pixel = vv[inside] * width + uu[inside]
        order = np.lexsort((depth[inside], pixel))  # by pixel, nearest first
        _, first = np.unique(pixel[order], return_index=True)
        nearest = order[first]
        canvas.reshape(-1, 3)[pixel[nearest]] = rgb[inside][nearest]
    return canvas


def stereo_panel(left_rgb: np.ndarray, disparity: np.ndarray, confidence: np.ndarray | None = None,
                 points: np.ndarray | None = None, max_disparity: float | None = None,
                 title: str | None = None) -> np.ndarray:
    """One picture of a stereo result: uint8 (2 * (H + CAPTION_PX), 2 * W, 3) RGB, plus CAPTION_PX
    rows with a `title`.

    Tiles: left image | colorize_disparity(disparity, max_disparity) with a scale bar in pixels
    underneath, and under that the `title` (what produced the disparity: model, time); confidence
    (grey, 1 = white) | the point cloud (H, W, 3 metres, NaN invalid) rendered from the side,
    coloured by the left image. A missing input leaves its tile blank.
    """
    left = _to_rgb8(left_rgb)
    height, width = left.shape[:2]
    disparity = np.asarray(disparity, dtype=np.float32)
    valid = np.isfinite(disparity)
    if max_disparity is None:
        max_disparity = float(disparity[valid].max()) if valid.any() else 1.0
    blank = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)
    if confidence is None:
        confidence_tile, confidence_title = blank, "confidence: none"
    else:
        grey = np.clip(np.nan_to_num(np.asarray(confidence, dtype=np.float32)) * 255.0 + 0.5, 0, 255)
        confidence_tile, confidence_title = _to_rgb8(grey.astype(np.uint8)), "confidence (white = 1)"
    if points is None:
        points_tile, points_title = blank, "points: none"
    else:
        points_tile = render_points(points, left, height, width)
        points_title = f"points ({int(np.isfinite(np.asarray(points)[..., 2]).sum())}), side view"
    left_column = [left, _caption(width, "left")]
    disparity_column = [colorize_disparity(disparity, max_disparity), disparity_scale_bar(width, max_disparity)]
    if title is not None:
        left_column.append(_caption(width, ""))
        disparity_column.append(_caption(width, title))
    top = np.concatenate([np.concatenate(left_column), np.concatenate(disparity_column)], axis=1)
    bottom = np.concatenate([np.concatenate([confidence_tile, _caption(width, confidence_title)]),
                             np.concatenate([points_tile, _caption(width, points_title)])], axis=1)
    return np.concatenate([top, bottom], axis=0)


def labelled_tiles(path: str | Path, rows: list[tuple[list[np.ndarray], list[str]]],
                   max_disparity: float | None = None) -> Path:
    """Write rows of captioned tiles as one PNG: a (H, W, 3) tile is an image, a (H, W) float
    tile a disparity map (colorize_disparity on one scale, 0 to max_disparity). Rows may
    differ in size; narrower rows are padded with the background colour."""
    from stereo_kd_core.data.io import write_image_rgb

    strips = []
    for tiles, titles in rows:
        cells = []
        for tile, title in zip(tiles, titles, strict=True):
            tile = np.asarray(tile)
            is_disparity = tile.ndim == 2 and tile.dtype.kind == "f"
            rgb = colorize_disparity(tile, max_disparity) if is_disparity else _to_rgb8(tile)
            cells.append(np.concatenate([rgb, _caption(rgb.shape[1], title)]))
        strips.append(np.concatenate(cells, axis=1))
    width = max(strip.shape[1] for strip in strips)
    strips = [np.pad(strip, ((0, 0), (0, width - strip.shape[1]), (0, 0))) for strip in strips]
    picture = np.concatenate(strips, axis=0)
    if max_disparity is not None:
        picture = np.concatenate([picture, disparity_scale_bar(width, max_disparity)])
    write_image_rgb(path, picture)
    return Path(path)


def _write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write {path} with OpenCV")
    for frame in frames:
        writer.write(cv2.cvtColor(_to_rgb8(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_animation(path: str | Path, frames: list[np.ndarray], fps: float = 5.0) -> Path:
    """Write uint8 HxWx3 RGB frames as a looping animated GIF with Pillow when Pillow is
    installed, else as an MP4 (OpenCV, mp4v) at `path` with suffix .mp4. Returns the file written."""
    path = Path(path)
    if not frames:
        raise ValueError("write_animation: no frames")
    try:
        from PIL import Image
    except ImportError:
        return _write_mp4(path.with_suffix(".mp4"), frames, fps)
    images = [Image.fromarray(_to_rgb8(frame)) for frame in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
