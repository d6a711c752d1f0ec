"""Result panel, point cloud view and animation files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stereo_kd_core.cli import main as cli_main
from stereo_kd_core.data.io import read_image_rgb, write_image_rgb
from stereo_kd_core.geometry import StereoGeometry
from stereo_kd_core.viz import (
    BACKGROUND_RGB,
    CAPTION_PX,
    colorize_disparity,
    render_points,
    stereo_panel,
    write_animation,
)

H, W = 40, 60


def scene():
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    disparity = np.tile(np.linspace(2, 30, W, dtype=np.float32), (H, 1))
    disparity[:5, :7] = np.nan
    confidence = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    return left, disparity, confidence


def test_panel_tiles():
    left, disparity, confidence = scene()
    geometry = StereoGeometry.from_intrinsics(50.0, 29.5, 19.5, 0.1)
    panel = stereo_panel(left, disparity, confidence, geometry.points_from_disparity(disparity), max_disparity=32)
    assert panel.shape == (2 * (H + CAPTION_PX), 2 * W, 3) and panel.dtype == np.uint8
    np.testing.assert_array_equal(panel[:H, :W], left)
    np.testing.assert_array_equal(panel[:H, W:], colorize_disparity(disparity, max_disparity=32))
    grey = panel[H + CAPTION_PX: 2 * H + CAPTION_PX, :W]
    np.testing.assert_array_equal(grey[..., 0], np.round(confidence * 255).astype(np.uint8))
    assert (grey[..., 0] == grey[..., 2]).all()

    # Scale bar under the disparity tile: the ramp runs from colour(0) to colour(max), with white labels.
    bar = panel[H: H + CAPTION_PX, W:]
    ramp = colorize_disparity(np.array([[0.0, 32.0]], dtype=np.float32), max_disparity=32)[0]
    np.testing.assert_array_equal(bar[5, 0], ramp[0])
    np.testing.assert_array_equal(bar[5, -1], ramp[1])
    assert (bar[15:] > 200).all(axis=-1).sum() > 10  # label text

    # The cloud view: the plane of points shows up in the image's colours.
    view = panel[H + CAPTION_PX: 2 * H + CAPTION_PX, W:]
    drawn = (view != BACKGROUND_RGB).any(axis=-1)
    assert 0.01 < drawn.mean() < 0.95
    colours = {tuple(c) for c in left.reshape(-1, 3)}
    assert all(tuple(c) in colours for c in view[drawn][:50])


def test_panel_without_confidence_and_points_and_mono16():
    left, disparity, _ = scene()
    mono16 = (left[..., 0].astype(np.uint16) << 8) | 0x7F
    panel = stereo_panel(mono16, disparity)
    np.testing.assert_array_equal(panel[:H, :W, 1], left[..., 0])  # 16 -> 8 bit, grey to RGB
    np.testing.assert_array_equal(panel[:H, W:], colorize_disparity(disparity))  # max = largest finite value
    empty_tiles = panel[H + CAPTION_PX: 2 * H + CAPTION_PX]
    assert (empty_tiles == BACKGROUND_RGB).all()


def test_render_points_keeps_the_nearest_point():
    # Two points straight ahead on the view axis of the centre: the nearer one must be drawn.
    points = np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 3.0]]], dtype=np.float32)
    colors = np.array([[[255, 0, 0], [255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    view = render_points(points, colors, 20, 20)
    drawn = view[(view != BACKGROUND_RGB).any(axis=-1)]
    assert {tuple(c) for c in drawn} <= {(255, 0, 0), (0, 0, 255)} and len(drawn) > 0
    all_nan = np.full((4, 4, 3), np.nan, dtype=np.float32)
    assert (render_points(all_nan, np.zeros((4, 4, 3), np.uint8), 8, 8) == BACKGROUND_RGB).all()


def test_write_animation_gif(tmp_path):
    frames = [np.full((12, 16, 3), value, dtype=np.uint8) for value in (0, 120, 250)]
    path = write_animation(tmp_path / "seq.gif", frames, fps=4)
    assert path == tmp_path / "seq.gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3 and gif.size == (16, 12)
        gif.seek(1)
        assert abs(int(np.asarray(gif.convert("RGB"))[0, 0, 0]) - 120) <= 4
        assert gif.info["duration"] == 250
    with pytest.raises(ValueError):
        write_animation(tmp_path / "none.gif", [])


def test_panel_title_goes_under_the_disparity():
    left, disparity, confidence = scene()
    plain = stereo_panel(left, disparity, confidence, max_disparity=32)
    titled = stereo_panel(left, disparity, confidence, max_disparity=32, title="dsnet-fast 9 ms")
    assert titled.shape == (plain.shape[0] + CAPTION_PX, 2 * W, 3)
    top = H + CAPTION_PX  # left | disparity tiles and their captions, as without a title
    np.testing.assert_array_equal(titled[:top], plain[:top])
    np.testing.assert_array_equal(titled[top + CAPTION_PX:], plain[top:])
    strip = titled[top: top + CAPTION_PX]
    assert (strip[:, :W] == BACKGROUND_RGB).all()  # nothing under the left image
    assert (strip[:, W:] > 200).all(axis=-1).sum() > 20  # white text under the disparity
    other = stereo_panel(left, disparity, confidence, max_disparity=32, title="sgbm 9 ms")
    assert (other[top: top + CAPTION_PX, W:] != strip[:, W:]).any()


def test_predict_panel_names_the_model_and_its_time(tmp_path, monkeypatch):
    from stereo_kd_core import viz

    captions = []
    original = viz._caption

    def recording(width, text):
        captions.append(text)
        return original(width, text)

    monkeypatch.setattr(viz, "_caption", recording)
    left, _, _ = scene()
    write_image_rgb(tmp_path / "l.png", left)
    write_image_rgb(tmp_path / "r.png", np.roll(left, -4, axis=1))
    assert cli_main(["predict", "--model", "sgbm", "--device", "cpu", "--max-disparity", "16",
                     str(tmp_path / "l.png"), str(tmp_path / "r.png"), "--out", str(tmp_path / "out")]) == 0
    panel = read_image_rgb(tmp_path / "out" / "panel.png")
    assert panel.shape == (2 * (H + CAPTION_PX) + CAPTION_PX, 2 * W, 3)
    np.testing.assert_array_equal(panel[:H, :W], left)
    titles = [text for text in captions if text.startswith("sgbm ")]
    assert len(titles) == 1 and titles[0].endswith(" ms (first run)"), captions
    # that title is what the panel shows under the disparity's scale bar
    top = H + CAPTION_PX
    np.testing.assert_array_equal(panel[top: top + CAPTION_PX, W:], original(W, titles[0]))
