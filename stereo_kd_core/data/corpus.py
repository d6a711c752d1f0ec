"""Real stereo pairs without ground truth (pseudo-label material), rebuilt from a committed
manifest (`real_pairs.json` beside this module) into Middlebury-like folders:

    OUT/<source>-<pair>/im0.png, im1.png   rectified, at most `width_px` wide, sides multiples of 32
    OUT/<source>-<pair>/meta.json          source, repository@commit, paths, licence, scale, checks
    OUT/checks.json                        every pair's checks and each source's summary

Images are read from local git copies of the manifest's repositories at the pinned commit
(`git cat-file`), never downloaded here: `--mirrors DIR` holds `owner+name/repo` (bare, as the
project's mirror tool writes them), `owner+name`, or a clone `name` / `owner/name`.
Raw pairs are rectified with their calibration (OpenCV stereoRectify -> our RectificationMaps).

Each pair is checked as a user would check a new camera, with OpenCV SGBM (left-right checked
inside, disp12MaxDiff=1): the fraction of pixels with a valid disparity must be clearly higher
for the pair as given than for the swapped pair (catches swapped left/right), and a vertical
search over the right image's row offset must peak at 0 (catches unrectified pairs). Pairs
that fail are written to checks.json and left out of the corpus.

    python -m stereo_kd_core.data.corpus --mirrors /work/.mirror --out runs/real_corpus
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from stereo_kd_core.rectification import CameraCalibration, RectificationMaps

MANIFEST = Path(__file__).with_name("real_pairs.json")
DEFAULT_WIDTH_PX = 512
SIZE_MULTIPLE = 32  # the networks' and the teacher cache's size granularity
CHECK_MAX_DISPARITY = 128
ROW_SEARCH_PX = 3  # vertical offsets -3..3 of the right image are tried
MIN_VALID_FRACTION = 0.15  # SGBM valid (left-right checked) pixels of a usable pair
MIN_SWAP_RATIO = 1.3  # valid fraction as given / swapped


class CorpusError(RuntimeError):
    """The manifest, a repository copy or a calibration file is unusable."""


@dataclass(frozen=True)
class Source:
    name: str
    repository: str  # owner/name on GitHub
    commit: str
    licence: str
    camera: str
    kind: str  # "scene" or "calibration_target"
    calibration: dict | None  # {"format": "euroc"|"boofcv", ...paths}; None: already rectified
    pairs: tuple[tuple[str, str, str], ...]  # (name, left path, right path)


def load_manifest(path: str | os.PathLike = MANIFEST) -> list[Source]:
    """The manifest's sources; CorpusError on a malformed entry or a count that disagrees."""
    document = json.loads(Path(path).read_text())
    sources = []
    for entry in document["sources"]:
        try:
            pairs = tuple((p["name"], p["left"], p["right"]) for p in entry["pairs"])
            source = Source(entry["name"], entry["repository"], entry["commit"], entry["licence"],
                            entry["camera"], entry.get("kind", "scene"), entry.get("calibration"), pairs)
        except KeyError as error:
            raise CorpusError(f"{path}: source {entry.get('name', '?')} lacks {error}") from None
        if entry.get("count") != len(pairs):
            raise CorpusError(f"{path}: source {source.name} says count {entry.get('count')}, lists {len(pairs)}")
        sources.append(source)
    return sources


# --- reading from repository copies --------------------------------------------------------
def find_git_dir(mirrors: str | os.PathLike, repository: str) -> Path:
    """The git directory of `repository` (owner/name) under `mirrors`."""
    mirrors = Path(mirrors)
    owner, name = repository.split("/")
    candidates = [mirrors / f"{owner}+{name}" / "repo", mirrors / f"{owner}+{name}" / "repo" / ".git",
                  mirrors / f"{owner}+{name}", mirrors / name / ".git", mirrors / owner / name / ".git"]
    for candidate in candidates:
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    raise CorpusError(f"no copy of {repository} under {mirrors} (tried {', '.join(map(str, candidates))}): "
                      f"git clone https://github.com/{repository} {mirrors / name}")


def blob_reader(git_dir: Path, commit: str) -> Callable[[str], bytes]:
    """path -> bytes of that file at `commit`; CorpusError naming the file when it is absent."""
    def read(path: str) -> bytes:
        result = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", f"{commit}:{path}"],
                                capture_output=True)
        if result.returncode != 0:
            raise CorpusError(f"{git_dir}: cannot read {path} at {commit[:12]}: "
                              f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout
    return read


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB (grey images repeated over 3 channels)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CorpusError(f"{what} is not a readable image ({len(data)} bytes; a Git LFS pointer?)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# --- calibration -------------------------------------------------------------------------
@dataclass(frozen=True)
class StereoCalibration:
    """OpenCV's stereo convention: X_right = R @ X_left + T (T in any length unit)."""

    width: int
    height: int
    k_left: np.ndarray
    d_left: np.ndarray
    k_right: np.ndarray
    d_right: np.ndarray
    r: np.ndarray
    t: np.ndarray


def _yaml(data: bytes) -> dict:
    # OpenCV-style "%YAML:1.0" directives are not YAML 1.1; drop directive lines.
    text = "\n".join(line for line in data.decode().splitlines() if not line.startswith("%"))
    return yaml.safe_load(text)


def _plumb_bob(coefficients: list[float]) -> np.ndarray:
    d = np.zeros(5)
    d[:len(coefficients)] = coefficients
    return d


def _euroc(read: Callable[[str], bytes], spec: dict) -> StereoCalibration:
    """EuRoC/Kalibr sensor.yaml per camera: T_BS (camera -> body), pinhole, radial-tangential."""
    cams = [_yaml(read(spec[side])) for side in ("left", "right")]
    for cam, side in zip(cams, ("left", "right"), strict=True):
        if cam.get("camera_model") != "pinhole" or cam.get("distortion_model") != "radial-tangential":
            raise CorpusError(f"{spec[side]}: only pinhole radial-tangential EuRoC cameras are supported")
    body_from = [np.asarray(cam["T_BS"]["data"], float).reshape(4, 4) for cam in cams]
    right_from_left = np.linalg.inv(body_from[1]) @ body_from[0]
    width, height = cams[0]["resolution"]

    def k(cam: dict) -> np.ndarray:
        fu, fv, cu, cv = cam["intrinsics"]
        return np.array([[fu, 0, cu], [0, fv, cv], [0, 0, 1.0]])
    return StereoCalibration(int(width), int(height), k(cams[0]), _plumb_bob(cams[0]["distortion_coefficients"]),
                             k(cams[1]), _plumb_bob(cams[1]["distortion_coefficients"]),
                             right_from_left[:3, :3], right_from_left[:3, 3])


def _boofcv(read: Callable[[str], bytes], spec: dict) -> StereoCalibration:
    """BoofCV stereo.yaml: pinhole + radial (k1, k2[, k3]) + t1, t2; `rightToLeft` maps right-camera
    points into the left camera's frame (rotation row-major, translation x, y, z)."""
    document = _yaml(read(spec["file"]))

    def camera(side: str) -> tuple[np.ndarray, np.ndarray, int, int]:
        cam = document[side]
        pinhole = cam["pinhole"]
        radial = cam["radial_tangential"]["radial"]
        if len(radial) > 3:
            raise CorpusError(f"{spec['file']}: {len(radial)} radial coefficients (OpenCV's plumb_bob takes 3)")
        k = np.array([[pinhole["fx"], pinhole["skew"], pinhole["cx"]], [0, pinhole["fy"], pinhole["cy"]], [0, 0, 1.0]])
        tangential = cam["radial_tangential"]
        d = _plumb_bob([*radial[:2], tangential["t1"], tangential["t2"], *radial[2:]])
        return k, d, int(pinhole["width"]), int(pinhole["height"])

    k_left, d_left, width, height = camera("left")
    k_right, d_right, _, _ = camera("right")
    right_to_left = document["rightToLeft"]
    rotation = np.asarray(right_to_left["rotation"], float).reshape(3, 3)
    translation = np.array([right_to_left["x"], right_to_left["y"], right_to_left["z"]], float)
    # X_left = Rrl X_right + t  =>  X_right = Rrl^T X_left - Rrl^T t
    return StereoCalibration(width, height, k_left, d_left, k_right, d_right, rotation.T, -rotation.T @ translation)


CALIBRATION_FORMATS = {"euroc": _euroc, "boofcv": _boofcv}


def read_calibration(read: Callable[[str], bytes], spec: dict) -> StereoCalibration:
    reader = CALIBRATION_FORMATS.get(spec.get("format"))
    if reader is None:
        raise CorpusError(f"calibration format {spec.get('format')!r} is not one of {sorted(CALIBRATION_FORMATS)}")
    calibration = reader(read, spec)
    if calibration.t[0] >= 0:
        raise CorpusError(f"calibration {spec}: the right camera is not to the right of the left one "
                          f"(T = {calibration.t.round(4).tolist()}); left and right swapped?")
    return calibration


def rectification_maps(calibration: StereoCalibration) -> tuple[RectificationMaps, RectificationMaps]:
    """Both cameras' remap tables onto a common rectified pinhole (zero disparity at infinity,
    alpha 0: only valid pixels)."""
    size = (calibration.width, calibration.height)
    r_left, r_right, p_left, p_right, _, _, _ = cv2.stereoRectify(
        calibration.k_left, calibration.d_left, calibration.k_right, calibration.d_right, size,
        calibration.r, calibration.t.reshape(3, 1), flags=cv2.CALIB_ZERO_DISPARITY, alpha=0)

    def maps(k: np.ndarray, d: np.ndarray, r: np.ndarray, p: np.ndarray) -> RectificationMaps:
        camera = CameraCalibration(calibration.width, calibration.height, "plumb_bob", tuple(d.tolist()),
                                   tuple(k.ravel().tolist()), tuple(r.ravel().tolist()), tuple(p.ravel().tolist()))
        return RectificationMaps.build(camera)
    return (maps(calibration.k_left, calibration.d_left, r_left, p_left),
            maps(calibration.k_right, calibration.d_right, r_right, p_right))


def fit_size(left: np.ndarray, right: np.ndarray, width_px: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Downscale to at most width_px wide (area filter), then centre-crop both sides to multiples
    of SIZE_MULTIPLE. Returns the pair and the scale (disparities scale by it)."""
    height, width = left.shape[:2]
    scale = min(1.0, width_px / width)
    if scale < 1.0:
        size = (round(width * scale), round(height * scale))
        left, right = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in (left, right))
    height, width = left.shape[:2]
    crop_h, crop_w = height - height % SIZE_MULTIPLE, width - width % SIZE_MULTIPLE
    if crop_h == 0 or crop_w == 0:
        raise CorpusError(f"image {width}x{height} is smaller than {SIZE_MULTIPLE} px after scaling")
    top, left_x = (height - crop_h) // 2, (width - crop_w) // 2
    window = (slice(top, top + crop_h), slice(left_x, left_x + crop_w))
    return np.ascontiguousarray(left[window]), np.ascontiguousarray(right[window]), scale


# --- checks ------------------------------------------------------------------------------
def _valid_fraction(matcher, left: np.ndarray, right: np.ndarray) -> float:
    return float(np.isfinite(matcher.predict(left, right).disparity).mean())


def _shift_rows(image: np.ndarray, rows: int) -> np.ndarray:
    return np.roll(image, rows, axis=0)


def check_pair(left: np.ndarray, right: np.ndarray, max_disparity: int = CHECK_MAX_DISPARITY) -> dict:
    """SGBM's valid fraction as given, swapped, and over vertical offsets of the right image;
    `ok` when the pair is usable as a rectified left/right pair (see the module docstring)."""
    from stereo_kd_core.estimator import StereoEstimator

    matcher = StereoEstimator.load("sgbm", max_disparity=min(max_disparity, left.shape[1] // 2 // 16 * 16),
                                   align_rows=False)  # the row search needs the rows as given
    margin = ROW_SEARCH_PX  # rows rolled around the border are cut from both images
    by_offset = {}
    for rows in range(-ROW_SEARCH_PX, ROW_SEARCH_PX + 1):
        shifted = _shift_rows(right, rows)
        by_offset[rows] = _valid_fraction(matcher, left[margin:-margin], shifted[margin:-margin])
    valid = by_offset[0]
    swapped = _valid_fraction(matcher, right, left)
    # the smallest offset within 2 % of the best: a rectified pair often ties at +-1 px
    best_fraction = max(by_offset.values())
    best_rows = min((rows for rows, fraction in by_offset.items() if fraction >= 0.98 * best_fraction), key=abs)
    reasons = []
    if valid < MIN_VALID_FRACTION:
        reasons.append(f"SGBM finds {valid:.0%} valid pixels (< {MIN_VALID_FRACTION:.0%})")
    if valid < MIN_SWAP_RATIO * swapped:
        reasons.append(f"swapped pair matches about as well ({swapped:.0%} against {valid:.0%}): left/right swapped?")
    if best_rows != 0 and by_offset[best_rows] > 1.1 * valid:
        reasons.append(f"rows align best at a {best_rows:+d} px offset of the right image: not rectified?")
    return {"valid_fraction": round(valid, 4), "swapped_valid_fraction": round(swapped, 4),
            "valid_fraction_by_row_offset": {str(k): round(v, 4) for k, v in by_offset.items()},
            "best_row_offset_px": best_rows, "ok": not reasons, "reasons": reasons}


# --- building ----------------------------------------------------------------------------
def build_corpus(out: str | os.PathLike, mirrors: str | os.PathLike, manifest: str | os.PathLike = MANIFEST,
                 width_px: int = DEFAULT_WIDTH_PX, sources: list[str] | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Write every manifest pair (rectified, checked) under `out`; pairs already written are kept.
    Returns the checks document also written to out/checks.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checks_path = out / "checks.json"
    document = json.loads(checks_path.read_text()) if checks_path.is_file() else {"pairs": {}, "sources": {}}
    for source in load_manifest(manifest):
        if sources and source.name not in sources:
            continue
        read = blob_reader(find_git_dir(mirrors, source.repository), source.commit)
        maps = rectification_maps(read_calibration(read, source.calibration)) if source.calibration else None
        kept = 0
        for name, left_path, right_path in source.pairs:
            case = f"{source.name}-{name}"
            if case in document["pairs"]:
                kept += document["pairs"][case]["ok"]
                continue
            left = decode_image(read(left_path), f"{source.repository}:{left_path}")
            right = decode_image(read(right_path), f"{source.repository}:{right_path}")
            if left.shape != right.shape:
                raise CorpusError(f"{case}: left {left.shape} and right {right.shape} differ in size")
            if maps is not None:
                left, right = maps[0].remap(left), maps[1].remap(right)
            left, right, scale = fit_size(left, right, width_px)
            check = check_pair(left, right)
            document["pairs"][case] = {**check, "source": source.name}
            if check["ok"]:
                case_dir = out / case
                case_dir.mkdir(exist_ok=True)
                for file_name, image in (("im0.png", left), ("im1.png", right)):
                    cv2.imwrite(str(case_dir / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                meta = {"source": source.name, "repository": source.repository, "commit": source.commit,
                        "left": left_path, "right": right_path, "licence": source.licence,
                        "camera": source.camera, "kind": source.kind, "rectified_here": maps is not None,
                        "scale": scale, "width": left.shape[1], "height": left.shape[0], "check": check}
                (case_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
                kept += 1
            else:
                log(f"{case}: left out: {'; '.join(check['reasons'])}")
        document["sources"][source.name] = {"pairs": len(source.pairs), "kept": kept}
        log(f"{source.name}: {kept}/{len(source.pairs)} pairs kept")
        checks_path.write_text(json.dumps(document, indent=1) + "\n")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stereo_kd_core.data.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirrors", required=True, help="folder with the manifest's repositories (git copies)")
    parser.add_argument("--out", default="runs/real_corpus", help="output folder (Middlebury-like CASE folders)")
    parser.add_argument("--manifest", default=str(MANIFEST), help="corpus manifest JSON")
    parser.add_argument("--width-px", type=int, default=DEFAULT_WIDTH_PX, help="maximum width of the written pairs")
    parser.add_argument("--source", action="append", help="build only this manifest source (repeatable)")
    args = parser.parse_args(argv)
    try:
        document = build_corpus(args.out, args.mirrors, args.manifest, args.width_px, args.source)
    except CorpusError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kept = sum(s["kept"] for s in document["sources"].values())
    print(f"{kept} pairs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
