"""Stereo pairs from real photographs: sub-pixel exact right views, z-buffered occlusion, the texture
pool (never the Motorcycle evaluation pair), determinism and scene statistics."""

import cv2
import numpy as np
import pytest
from test_synthetic import warp_right_to_left  # the right view warped by a disparity (bilinear)

from stereo_kd_core.data import photo_stereo
from stereo_kd_core.data.photo_stereo import PhotoStereoGenerator, _Layer, list_texture_files
from stereo_kd_core.data.synthetic import SyntheticStereoDataset

HEIGHT, WIDTH, MAX_DISPARITY = 48, 96, 48


def _ramp_layer(x0: int, width: int, disparity: float, height: int = HEIGHT, value: float = 0.0) -> _Layer:
    """A layer whose colour is its left-image column (x0 + j) in every channel: lets a test read
    back, from the right view, which left column each right pixel shows."""
    columns = np.arange(x0, x0 + width, dtype=np.float32)
    colour = np.repeat(np.repeat((columns + value)[None, :, None], height, 0), 3, 2)
    return _Layer(0, x0, colour, np.full((height, width), disparity, np.float32), np.ones((height, width), bool))


def test_right_view_is_the_sub_pixel_shift_of_the_left():
    generator = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, camera_effects=False)
    shift = 3.25
    colour, depth = generator._render_right([_ramp_layer(-2, WIDTH + 10, shift)])
    # right pixel xr sees left column xr + shift, whose colour is that column: linear, so exact
    expected = np.arange(WIDTH, dtype=np.float32) + shift
    np.testing.assert_allclose(colour[5, :, 0], expected, atol=1e-4)
    np.testing.assert_allclose(depth, shift)


def test_nearer_layer_hides_the_farther_one_and_occlusion_is_marked():
    generator = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, camera_effects=False)
    background = _ramp_layer(-2, WIDTH + 20, 2.0)
    near = 12.0
    box = _Layer(0, 40, np.full((HEIGHT, 20, 3), 500.0, np.float32), np.full((HEIGHT, 20), near, np.float32),
                 np.ones((HEIGHT, 20), bool))
    layers = [background, box]
    _, disparity = generator._render_left(layers)
    right, right_depth = generator._render_right(layers)
    assert np.all(disparity[:, 40:60] == near) and np.all(disparity[:, :40] == 2.0)
    # the box covers left columns 40..59, right columns 28..47 (+ half-pixel caps)
    assert np.all(right_depth[:, 28:48] == near)
    assert np.all(right[:, 28:48] == 500.0)
    nocc = generator._non_occluded(disparity, right_depth)
    # background left columns whose right position (x - 2) falls under the box are occluded:
    # x - 2 in [27.5, 47.5] -> x in 30..49, minus the box's own columns 40..59 -> 30..39
    assert not nocc[:, 31:39].any()
    assert nocc[:, 5:28].all() and nocc[:, 41:59].all() and nocc[:, 62:90].all()
    # nothing beyond the right image's left edge is visible: x - d < 0
    assert not nocc[:, 0:2].any()


def test_ground_truth_is_exact_on_generated_scenes():
    """Every right pixel shows the left-image point x = xr + d_right, i.e. the linear interpolation
    of the two left pixels around it when both lie on the surface the right pixel sees."""
    generator = PhotoStereoGenerator(64, 128, 64, seed=5, camera_effects=False)
    for index in range(3):
        layers = generator.layers(index)
        left, disparity = generator._render_left(layers)
        right, right_disparity = generator._render_right(layers)
        assert np.isfinite(disparity).all()
        rows, columns = np.nonzero(np.isfinite(right_disparity))
        x = columns + right_disparity[rows, columns]
        x0 = np.floor(x).astype(int)
        inside = (x0 >= 0) & (x0 + 1 < 128)
        rows, columns, x, x0 = rows[inside], columns[inside], x[inside], x0[inside]
        same_surface = ((np.abs(disparity[rows, x0] - right_disparity[rows, columns]) < 0.5)
                        & (np.abs(disparity[rows, x0 + 1] - right_disparity[rows, columns]) < 0.5))
        rows, columns, x, x0 = rows[same_surface], columns[same_surface], x[same_surface], x0[same_surface]
        assert same_surface.mean() > 0.8
        t = (x - x0)[:, None]
        expected = (1 - t) * left[rows, x0] + t * left[rows, x0 + 1]
        error = np.abs(right[rows, columns] - expected).mean(axis=1)
        # exact to float rounding (measured 1e-5); a right view half a pixel off errs by 0.3-6
        # grey levels at the median and 5-26 at the 95th percentile
        assert np.median(error) < 0.01, index
        assert np.percentile(error, 95) < 0.5, index
        sample = generator.sample(index)
        assert sample["nocc"].mean() > 0.5
        np.testing.assert_array_equal(sample["disparity"], disparity)


def test_deterministic_per_seed_and_index():
    first = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3).sample(4)
    again = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=3).sample(4)
    other = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=4).sample(4)
    for key in ("left", "right", "disparity", "nocc"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["left"], other["left"])


def test_scenes_cover_near_and_far_and_many_objects():
    generator = PhotoStereoGenerator(96, 192, 96, seed=9)
    maxima, minima, counts = [], [], []
    for index in range(8):
        disparity = generator.sample(index)["disparity"]
        maxima.append(disparity.max())
        minima.append(disparity.min())
        counts.append(len(generator.layers(index)) - 1)
    scene_max = 0.8 * 96
    assert max(maxima) > 0.6 * scene_max and max(maxima) <= scene_max + 1e-3
    assert min(minima) < 0.1 * scene_max and min(minima) >= 0.5
    assert max(counts) >= 10


def test_builtin_pool_never_holds_the_motorcycle_evaluation_pair():
    import skimage.data

    assert "stereo_motorcycle" not in photo_stereo.BUILTIN_PHOTO_NAMES
    motorcycle_left = skimage.data.stereo_motorcycle()[0]
    for photo in photo_stereo.builtin_photos():
        assert photo.shape != motorcycle_left.shape or not np.array_equal(photo, motorcycle_left)


def test_texture_folder_keeps_one_rendition_per_wallpaper(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)
    package = tmp_path / "Autumn" / "contents"
    (package / "images").mkdir(parents=True)
    cv2.imwrite(str(package / "images" / "2560x1600.png"), cv2.resize(image, (600, 400)))
    cv2.imwrite(str(package / "images" / "720x1440.png"), image)
    cv2.imwrite(str(package / "screenshot.png"), image)
    cv2.imwrite(str(tmp_path / "photo.jpg"), image)
    cv2.imwrite(str(tmp_path / "motorcycle_im0.png"), image)
    (tmp_path / "notes.txt").write_text("not an image")
    names = [p.relative_to(tmp_path).as_posix() for p in list_texture_files(tmp_path)]
    assert names == ["Autumn/contents/images/2560x1600.png", "photo.jpg"]
    generator = PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, textures=tmp_path, builtin_photos=False)
    assert len(generator.photos) == 2
    assert generator.sample(0)["left"].shape == (HEIGHT, WIDTH, 3)


def test_missing_texture_folder_and_empty_pool_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, textures=tmp_path / "nope").sample(0)
    with pytest.raises(FileNotFoundError, match="no readable images"):
        PhotoStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, textures=tmp_path, builtin_photos=False).sample(0)


def test_dataset_kinds():
    photo = SyntheticStereoDataset(2, seed=1, height=32, width=64, max_disparity=32)
    assert photo[0]["name"].startswith("photo_")
    planes = SyntheticStereoDataset(2, seed=1, height=32, width=64, max_disparity=32, kind="planes")
    assert planes[0]["name"].startswith("synthetic_")
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        SyntheticStereoDataset(2, kind="cubes")


def _photometric_error(left: np.ndarray, right: np.ndarray, disparity: np.ndarray) -> np.ndarray:
    """|left(x) - right(x - d)| per pixel (grey levels, mean over channels)."""
    return np.abs(left.astype(np.float32) - warp_right_to_left(right, disparity)).mean(axis=2)


def test_glossy_surfaces_reflect_at_their_own_disparity_and_keep_the_ground_truth():
    """gloss_prob: the same scenes (ground truth, occlusion) with reflections blended over glossy
    layers; a reflection moves between the views by its virtual disparity, not the surface's, so
    the views stop agreeing under the ground truth exactly where the colour changed."""
    plain = PhotoStereoGenerator(64, 128, 64, seed=5, camera_effects=False)
    glossy = PhotoStereoGenerator(64, 128, 64, seed=5, camera_effects=False, gloss_prob=1.0)
    on_plain, on_glossy = [], []  # photometric errors under the ground truth at the pixels gloss changed
    for index in range(6):
        a, b = plain.sample(index), glossy.sample(index)
        np.testing.assert_array_equal(a["disparity"], b["disparity"])
        np.testing.assert_array_equal(a["nocc"], b["nocc"])
        changed = np.abs(a["left"].astype(int) - b["left"].astype(int)).max(axis=2) > 2
        assert changed.mean() < 1.0
        error_plain = _photometric_error(a["left"], a["right"], a["disparity"])
        error_glossy = _photometric_error(b["left"], b["right"], b["disparity"])
        far = a["nocc"] & ~_near(changed)  # nothing glossy within reach: untouched
        np.testing.assert_array_equal(error_glossy[far], error_plain[far])
        on_plain.append(error_plain[changed & a["nocc"]])
        on_glossy.append(error_glossy[changed & a["nocc"]])
    on_plain, on_glossy = np.concatenate(on_plain), np.concatenate(on_glossy)
    assert on_plain.size > 1000
    # the plain views agree under the ground truth (rounding, texture edges); the glossy ones do not
    assert np.median(on_glossy) > np.median(on_plain) + 3.0, (np.median(on_plain), np.median(on_glossy))
    with pytest.raises(ValueError, match="gloss_prob"):
        PhotoStereoGenerator(64, 128, 64, gloss_prob=1.5)


def _near(mask: np.ndarray, radius: int = 3) -> np.ndarray:
    """Pixels within `radius` of `mask` (the right view's glossy pixels land up to a disparity away)."""
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)).astype(bool)
