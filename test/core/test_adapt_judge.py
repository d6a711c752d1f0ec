"""`stereo-kd adapt` never ends worse than it started: the judge (evidence that is not the
teacher's), the best checkpoint along the run, the decision and final.pt, and the CPU default
(bf16 where the CPU computes it, labels from the cache, no live teacher). Tiny models, 64x128."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_adapt import FAST, HEIGHT, MAX_DISPARITY, WIDTH, ConstantEstimator, tiny_checkpoint

from stereo_kd_core.checkpoint import load_checkpoint
from stereo_kd_core.cli import main as cli_main
from stereo_kd_core.data.io import read_pfm, write_pfm
from stereo_kd_core.data.synthetic import SyntheticStereoGenerator, write_middlebury_dataset
from stereo_kd_core.models import build_model
from stereo_kd_core.models.photometric import photometric_settings, set_photometric
from stereo_kd_core.registry import resolve_shipped
from stereo_kd_core.train import adapt_judge
from stereo_kd_core.train.adapt import run_adapt
from stereo_kd_core.train.adapt_judge import ADAPTED_CHECKPOINT, Judge, JudgeFrame, settle, visible_in_both
from stereo_kd_core.train.label_cache import EstimatorTeacher
from stereo_kd_core.train.trainer import resolve_amp

EXACT_STEPS, SHIFTED_STEPS = 16, 6
JUDGE = {"criterion": "photometric", "min_gain": 0.005, "max_frames": 8, "record_all": False}


def labelled_folder(root, n: int, seed: int, shift_px: float = 0.0, kind: str = "planes") -> tuple[str, str]:
    """n generator pairs (Middlebury layout, ground truth included) and labels/ = their ground
    truth + shift_px, named after the cases: (frames folder, teacher spec)."""
    cases = write_middlebury_dataset(root / "frames", n, seed=seed, height=HEIGHT, width=WIDTH,
                                     max_disparity=MAX_DISPARITY, kind=kind)
    labels = root / f"labels{shift_px:+.0f}"
    labels.mkdir()
    for case in map(Path, cases):
        truth = read_pfm(case / "disp0GT.pfm")
        shifted = np.where(np.isfinite(truth), truth + shift_px, np.inf).astype(np.float32)
        write_pfm(labels / f"{case.name}.pfm", shifted)
    return str(root / "frames"), f"labels:{labels}"


def adapt_on(frames: str, teacher: str, init: str, out, steps: int, **overrides) -> dict:
    return run_adapt([frames], out, teacher=teacher, init=init, device="cpu",
                     overrides={**FAST, "train.steps": steps, "train.checkpoint_every": steps // 2,
                                "adapt.holdout": 0.0, "adapt.drop_worst": 0.0, "train.optimizer.lr": 3e-3,
                                **overrides})


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny student from random weights (every domain is new to it) adapted on exact labels."""
    root = tmp_path_factory.mktemp("exact")
    frames, teacher = labelled_folder(root, 3, seed=3)
    return root, adapt_on(frames, teacher, tiny_checkpoint(root / "init.pt"), root / "run", EXACT_STEPS)


def test_exact_labels_on_a_new_domain_keep_the_adapted_weights(exact_run):
    _, report = exact_run
    judge = report["judge"]
    assert judge["kept"] == "adapted" and judge["final"] == "adapted", judge
    scores = {int(k): v for k, v in judge["scores"].items()}
    assert set(scores) == {0, EXACT_STEPS // 2, EXACT_STEPS}  # the start, the checkpoint, the end
    assert scores[judge["best_step"]]["ground_truth"] < scores[0]["ground_truth"]  # truly better
    final = load_checkpoint(report["final"])
    assert final["step"] == judge["best_step"] and final["extra"]["judge"]["final"] == "adapted"
    assert {"photometric", "left_right", "teacher", "ground_truth"} <= set(scores[0])  # recorded beside the criterion


def test_labels_five_pixels_off_keep_the_start_and_say_so(tmp_path, capsys):
    """The shipped student, already good on pairs made from photographs, taught labels 5 px off."""
    frames, teacher = labelled_folder(tmp_path, 3, seed=3, shift_px=5.0, kind="photo")
    start = str(resolve_shipped("dsnet-fast")[0])
    report = adapt_on(frames, teacher, start, tmp_path / "run", SHIFTED_STEPS, **{"train.optimizer.lr": 1e-3})
    judge = report["judge"]
    assert judge["kept"] == "start" and judge["final"] == "start", judge
    assert judge["best"] >= judge["start"] * (1 - judge["min_gain"])
    # the teacher's labels say the opposite: the student moved toward them, away from the truth
    scores = {int(k): v for k, v in judge["scores"].items()}
    assert scores[SHIFTED_STEPS]["teacher"] < scores[0]["teacher"]
    assert scores[SHIFTED_STEPS]["ground_truth"] > scores[0]["ground_truth"]
    # final.pt holds the start's weights; adapted.pt the turned-down ones
    for key, value in load_checkpoint(start)["state_dict"].items():
        torch.testing.assert_close(load_checkpoint(report["final"])["state_dict"][key], value, rtol=0, atol=0)
    stored = json.loads((tmp_path / "run" / "before_after.json").read_text())
    assert stored["judge"]["kept"] == "start" and stored["judge"]["start"] == pytest.approx(judge["start"])
    # the console says so, with the numbers; --keep-anyway writes the adapted weights
    command = ["adapt", "--data", frames, "--teacher", teacher, "--init", start, "--out", str(tmp_path / "run"),
               "--device", "cpu", "--steps", str(SHIFTED_STEPS), "--holdout", "0", "--drop-worst", "0"]
    overrides = {**FAST, "train.checkpoint_every": SHIFTED_STEPS // 2, "train.optimizer.lr": 1e-3}
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    assert cli_main(command) == 0  # the finished run again: no relabelling, no training
    line = capsys.readouterr().out
    assert "KEEPS THE STARTING weights" in line and f"start {judge['start']:.4f}" in line
    assert f"best adapted {judge['best']:.4f}" in line
    assert cli_main([*command, "--keep-anyway"]) == 0
    assert "--keep-anyway: final.pt holds the adapted weights" in capsys.readouterr().out
    kept_anyway = load_checkpoint(tmp_path / "run" / "final.pt")
    for key, value in load_checkpoint(tmp_path / "run" / ADAPTED_CHECKPOINT)["state_dict"].items():
        torch.testing.assert_close(kept_anyway["state_dict"][key], value, rtol=0, atol=0)


class Scripted(torch.nn.Module):
    """Stands in for a student: `value` is both its weight and the criterion the judge reads."""

    def __init__(self, value: float):
        super().__init__()
        self.register_buffer("weight", torch.tensor([value], dtype=torch.float64))


@pytest.mark.parametrize(("values", "best_step", "kept"), [
    ({0: 1.0, 5: 0.8, 10: 0.7, 15: 0.9}, 10, "adapted"),   # the best checkpoint, not the last
    ({0: 1.0, 5: 1.02, 10: 0.998, 15: 1.1}, 10, "start"),  # best by less than min_gain: the start
    ({0: 1.0, 5: 1.3, 10: 1.2, 15: 1.1}, 15, "start"),
])
def test_best_checkpoint_and_decision_follow_the_criterion(tmp_path, monkeypatch, values, best_step, kept):
    monkeypatch.setattr(adapt_judge, "measure", lambda network, *args: {
        "photometric": float(network.weight), "left_right": 1.0 - float(network.weight)})
    judge = Judge([], [], tmp_path, JUDGE, {}, "cpu", "fp32")
    saved = {}
    monkeypatch.setattr(adapt_judge, "save_checkpoint", lambda path, network, config, **kw: saved.update(
        {path.name: float(network.weight), **({"step": kw["step"]} if path.name == ADAPTED_CHECKPOINT else {})}))
    for step, value in values.items():
        judge.record(step, Scripted(value))
    judge.record(5, Scripted(0.0))  # a step is scored once (a resumed run's checkpoints)
    decision = judge.decision()
    assert (decision["best_step"], decision["kept"]) == (best_step, kept)
    assert saved[ADAPTED_CHECKPOINT] == values[best_step] and saved["step"] == best_step
    assert json.loads((tmp_path / "judge.json").read_text())["scores"]["5"]["photometric"] == values[5]
    # another criterion picks another checkpoint from the same scores
    other = Judge([], [], tmp_path, {**JUDGE, "criterion": "left_right"}, {}, "cpu",
                  "fp32")
    other.scores = judge.scores
    assert other.best_adapted_step() == max(values, key=lambda s: values[s] if s else -1)


@pytest.mark.parametrize(("photometric_after", "kept"), [(0.0741, "start"), (0.0668, "adapted"), (0.060, "adapted")])
def test_the_guard_keeps_the_start_when_its_criterion_gets_worse(tmp_path, monkeypatch, photometric_after, kept):
    """The left-right check improves at step 150 (0.0545 -> 0.0483, as the Middlebury run that fooled
    it); the adapted weights are kept only if the photometric error is not worse by more than 5 %."""
    scores = {0: (0.0545, 0.0662), 150: (0.0483, photometric_after)}
    monkeypatch.setattr(adapt_judge, "measure", lambda network, *args: dict(
        zip(("left_right", "photometric"), scores[int(network.weight)], strict=True)))
    monkeypatch.setattr(adapt_judge, "save_checkpoint", lambda *args, **kwargs: None)
    config = {**JUDGE, "criterion": "left_right", "guard": "photometric", "guard_tolerance": 0.05}
    judge = Judge([], [], tmp_path, config, {}, "cpu", "fp32")
    for step in scores:
        judge.record(step, Scripted(step))
    decision = judge.decision()
    assert decision["kept"] == kept and decision["best_step"] == 150
    assert decision["guard"]["held"] == (kept == "adapted")
    if kept == "start":
        assert "photometric got worse (0.0662 -> 0.0741, more than 5%)" in adapt_judge.describe(
            {**decision, "final": "start"})
    with pytest.raises(ValueError, match="adapt.judge.guard"):
        Judge([], [], tmp_path, {**config, "guard": "sharpness"}, {}, "cpu", "fp32")
    assert Judge([], [], tmp_path, {**config, "guard": "left_right"}, {}, "cpu", "fp32").guard is None


def test_settle_writes_the_start_or_the_adapted_weights(tmp_path, monkeypatch):
    start_path, adapted_path = tiny_checkpoint(tmp_path / "start.pt", seed=0), tiny_checkpoint(tmp_path / "a.pt", 1)
    from stereo_kd_core.checkpoint import load_model

    start = load_model(start_path)
    monkeypatch.setattr(adapt_judge, "measure", lambda network, *args: {"photometric": 1.0})
    small_pairs = {"like": [384, 640], "max_scale": 2.0}  # how the start runs: the written file runs so too
    photometric = {"saturation": 0.25, "match_exposure": True}
    judge = Judge([], [], tmp_path, JUDGE, start.config, "cpu", "fp32", 1.25, True, small_pairs, photometric)
    judge.record(0, start)
    judge.record(5, load_model(adapted_path))  # equal score: not better
    for keep_anyway, expected in ((False, start_path), (True, adapted_path)):
        final, candidate, decision = settle(judge, start, tmp_path / "final.pt", {"recipe": 1}, keep_anyway)
        assert decision["kept"] == "start" and decision["final"] == ("adapted" if keep_anyway else "start")
        written, reference = load_checkpoint(tmp_path / "final.pt"), load_checkpoint(expected)
        runs_as = load_model(tmp_path / "final.pt")
        assert (runs_as.working_scale, runs_as.fit_range, runs_as.small_pairs) == (1.25, True, small_pairs)
        assert photometric_settings(runs_as) == photometric
        for key, value in reference["state_dict"].items():
            torch.testing.assert_close(written["state_dict"][key], value, rtol=0, atol=0)
        assert candidate is not None


def test_visible_pixels_exclude_matches_outside_and_occluded():
    disparity = torch.full((1, 1, 10), 2.0)
    disparity[0, 0, 6] = 5.0  # a near pixel at x = 6 lands on 1
    visible = visible_in_both(disparity)[0, 0].tolist()
    # x = 0, 1: x - 2 < 0; x = 5 lands on 3, more than OCCLUSION_PX (1) behind the near pixel's 1;
    # x = 3 and 4 land on 1 and 2: within the tolerance
    assert visible == [False, False, True, True, True, False, True, True, True, True]


def test_photometric_criterion_prefers_the_true_disparity():
    sample = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=4).sample(0)
    truth = np.nan_to_num(sample["disparity"], nan=0.0).astype(np.float32)

    class Fixed(torch.nn.Module):  # a "network" that outputs a fixed disparity map
        max_disparity, num_outputs = MAX_DISPARITY, 1

        def __init__(self, disparity):
            super().__init__()
            self.register_buffer("disparity", torch.from_numpy(disparity))

        def forward(self, left, right):
            return self.disparity[None].expand(left.shape[0], -1, -1)[:, : left.shape[2], : left.shape[3]], \
                torch.ones(left.shape[0], left.shape[2], left.shape[3])

    frame = JudgeFrame(sample["left"], sample["right"])
    scores = {shift: adapt_judge.measure(Fixed(truth + shift), [frame], criteria=("photometric",))["photometric"]
              for shift in (0.0, 1.0, 5.0)}
    assert scores[0.0] < scores[1.0] < scores[5.0]


def test_every_network_is_judged_as_the_start_sees_colour_and_exposure(tmp_path):
    """The trainer's student is built from its config (the pair as captured): the judge scores it
    as the start runs, with the start's photometric settings, and leaves the network as it was."""
    from stereo_kd_core.checkpoint import load_model

    sample = SyntheticStereoGenerator(HEIGHT, WIDTH, MAX_DISPARITY, seed=5).sample(0)
    frame = JudgeFrame(sample["left"], sample["right"], truth=sample["disparity"].astype(np.float32))
    network = load_model(tiny_checkpoint(tmp_path / "start.pt", seed=0))
    grey = set_photometric(load_model(tmp_path / "start.pt"), {"saturation": 0.0}, "test")
    judged = adapt_judge.measure(network, [frame], criteria=("ground_truth",), photometric={"saturation": 0.0})
    assert judged == adapt_judge.measure(grey, [frame], criteria=("ground_truth",))
    assert judged != adapt_judge.measure(network, [frame], criteria=("ground_truth",))
    assert photometric_settings(network) == {}


def test_amp_auto_is_bf16_where_the_cpu_computes_it(monkeypatch):
    import stereo_kd_core.estimator as estimator

    for native, expected in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(estimator, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_amp("auto", torch.device("cpu")) == expected
    assert resolve_amp("none", torch.device("cpu")) == "none"


def test_cpu_default_trains_in_bf16_from_the_label_cache_without_a_live_teacher(tmp_path, monkeypatch):
    """The recipe's defaults (amp auto) with a project-network teacher and the labels alone
    (adapt.internal null; the cached cost point is tested in test_adapt_costs.py): the teacher
    runs only to fill the label cache; training runs under bf16 autocast."""
    import stereo_kd_core.estimator as estimator

    monkeypatch.setattr(estimator, "cpu_has_native_bf16", lambda: True)
    frames, _ = labelled_folder(tmp_path, 2, seed=5)
    teacher = tiny_checkpoint(tmp_path / "teacher.pt", seed=1)
    bf16 = []
    network_class = type(build_model(load_checkpoint(teacher)["config"]))
    original_forward = network_class.forward

    def recording_forward(self, left, right):
        if self.training:  # the student in a training step (labels, judge and evaluation run in eval mode)
            bf16.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original_forward(self, left, right)

    monkeypatch.setattr(network_class, "forward", recording_forward)
    report = run_adapt([frames], tmp_path / "run", teacher=teacher, init=tiny_checkpoint(tmp_path / "init.pt"),
                       device="cpu", overrides={**FAST, "train.steps": 2, "adapt.holdout": 0.0,
                                                "adapt.internal": None})
    assert report["training_precision"] == "bf16" and bf16 == [True, True]
    assert report["labels_computed"] == 2 and report["internal_distillation"] is None
    # the teacher labelled in bf16 too, and says so in the label cache's identity
    assert report["label_precision"] == "bf16"
    assert json.loads((tmp_path / "run" / "labels" / "teacher.json").read_text())["precision"] == "bf16"
    with open(tmp_path / "run" / "log.csv") as f:
        assert f.readline().strip().split(",")[-1] == "loss.labels"  # no internal points


class HalfEstimator(ConstantEstimator):
    """`value` on the left half of the image, `other` on the right half."""

    def __init__(self, value: float, other: float):
        super().__init__(value)
        self.other = other

    def predict(self, left, right, geometry=None):
        prediction = super().predict(left, right)
        prediction.disparity[:, left.shape[1] // 2:] = self.other
        return prediction


def test_labels_where_independent_evidence_disagrees_do_not_supervise():
    """The teacher passes its own left-right check everywhere (a constant 4 px); where the
    starting student disagrees (10 px on the right half) and SGBM has no say (the pair is
    narrower than SGBM's range), the label gets confidence 0 under "either" and "student"."""
    rng = np.random.default_rng(0)
    left, right = (rng.integers(0, 255, (8, 48, 3), dtype=np.uint8) for _ in range(2))
    student = HalfEstimator(4.5, 10.0)
    for agreement in ("student", "either"):
        teacher = EstimatorTeacher(ConstantEstimator(4.0), {"teacher": "c"}, 1.0)
        teacher.use_agreement(agreement, student, "start.pt")
        _, confidence = teacher.label(None, left, right)
        np.testing.assert_allclose(confidence[:, 4:24], 0.8, rtol=1e-6)  # agrees within 2 px: own confidence
        assert (confidence[:, 24:] == 0).all() and (confidence[:, :4] == 0).all()  # disagrees; leaves the view
        assert teacher.identity() == {"teacher": "c", "lr_check_px": 1.0, "agreement": agreement,
                                      "student": "start.pt"}  # another rule -> other labels, not mixed
    with pytest.raises(ValueError, match="needs the starting student"):
        EstimatorTeacher(ConstantEstimator(4.0), {"teacher": "c"}, 1.0).use_agreement("either")


def test_teacher_precision_auto_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch):
    import stereo_kd_core.estimator as estimator
    from stereo_kd_core.train.label_cache import teacher_precision

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(estimator, "cpu_has_native_bf16", lambda native=native: native)
        assert teacher_precision("auto", "cpu") == expected
        assert teacher_precision("auto", "cuda:0") == "fp32"
        assert teacher_precision("fp32", "cpu") == "fp32" and teacher_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="teacher_precision"):
        teacher_precision("fp16", "cpu")
