"""Recipes and the trainer: validation, schedules, sharding, exact resume, NaN handling,
a real tiny distillation run (CPU, seconds)."""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from stereo_kd_core.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.train import NonFiniteLossError, RecipeError, Trainer, load_recipe, run_training
from stereo_kd_core.train.recipe import RECIPES_DIR, TEST_SPLIT_SEED
from stereo_kd_core.train.trainer import StepBatchSampler, lr_factor

TINY_TEACHER = dict(default_config("acv-teacher", 32), stem_channels=8, layer_channels=[8, 8, 16, 16],
                    layer_blocks=[1, 1, 1, 1], groups=4, concat_channels=4, attention_channels=4,
                    aggregation_channels=8)


def read_log(out_dir: Path) -> list[dict[str, str]]:
    with open(out_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, build_model(TINY_TEACHER), TINY_TEACHER)
    return path


# --- recipes -----------------------------------------------------------------------------
def test_shipped_recipes_validate_and_never_train_on_the_test_split():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    for required in ("acv-teacher", "dsnet", "dsnet-fast", "distill-dsnet", "distill-dsnet-fast",
                     "tiny-acv-teacher", "tiny-dsnet", "tiny-distill-dsnet"):
        assert required in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe["data"]["train"].get("seed") != TEST_SPLIT_SEED
        assert ("teacher" in recipe) == name.startswith(("distill", "tiny-distill"))
        if "adapt" in recipe:  # adapt recipes (adapt, real-mix-*) carry every key adapt needs
            from stereo_kd_core.train.adapt import adapt_recipe

            assert adapt_recipe(name, recipe["model"], {})["adapt"]["judge"]["criterion"]


def test_recipe_errors_name_the_bad_key():
    with pytest.raises(RecipeError, match="'train.optimiser'"):
        load_recipe("tiny-dsnet", {"train.optimiser": {"name": "adam"}})
    with pytest.raises(RecipeError, match="'train.optimizer.momentum'"):
        load_recipe("tiny-dsnet", {"train.optimizer.momentum": 0.9})
    with pytest.raises(RecipeError, match="'distill.cost.temprature'"):
        load_recipe("tiny-distill-dsnet", {"distill.cost.temprature": 2})
    with pytest.raises(RecipeError, match="test split"):
        load_recipe("tiny-dsnet", {"data.train.seed": TEST_SPLIT_SEED})
    with pytest.raises(RecipeError, match=r"\['milestones'\] do not apply to 'one_cycle'"):
        load_recipe("tiny-dsnet", {"train.schedule.milestones": [1]})
    with pytest.raises(RecipeError, match="no arguments \\['layer_width'\\]"):
        Trainer(load_recipe("tiny-dsnet", {"model.layer_width": 3}), "unused")
    with pytest.raises(RecipeError, match="data.augment: .*'blur'"):
        Trainer(load_recipe("tiny-dsnet", {"data.augment.blur": 1}), "unused")
    with pytest.raises(RecipeError, match="neither a file nor a shipped recipe"):
        load_recipe("no-such-recipe")


def test_overrides_are_parsed_like_yaml():
    recipe = load_recipe("tiny-dsnet", {"train.steps": "7", "train.optimizer.lr": "1e-4",
                                        "data.crop": "[64, 128]"})
    assert recipe["train"]["steps"] == 7
    assert recipe["train"]["optimizer"]["lr"] == 1e-4
    assert recipe["data"]["crop"] == [64, 128]


# --- schedule and data order -------------------------------------------------------------
def test_learning_rate_schedules():
    multistep = {"name": "multistep", "milestones": [10, 20], "gamma": 0.5}
    assert [lr_factor(multistep, s, 30) for s in (0, 9, 10, 19, 20, 29)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    one_cycle = {"name": "one_cycle", "pct_start": 0.1}
    factors = [lr_factor(one_cycle, s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 25)
    assert factors[10] == pytest.approx(1.0) and max(factors) == pytest.approx(1.0)
    assert factors[99] == pytest.approx(1 / (25 * 1e4))
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11], strict=True))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))


def test_step_sampler_covers_each_epoch_and_shards_ranks():
    sampler = StepBatchSampler(dataset_size=10, batch_size=2, seed=3, start_step=0, end_step=10)
    batches = list(sampler)
    first_epoch = [index for batch in batches[:5] for _, index in batch]
    assert sorted(first_epoch) == list(range(10))
    assert {epoch for batch in batches[5:] for epoch, _ in batch} == {1}
    # resuming at step 6 yields the same batches as the uninterrupted sampler
    resumed = StepBatchSampler(10, 2, 3, start_step=6, end_step=10)
    assert list(resumed) == batches[6:]
    # two ranks of batch 1 split the single-rank global batch of 2
    ranks = [StepBatchSampler(10, 1, 3, 0, 10, rank=r, world_size=2) for r in (0, 1)]
    for step in range(10):
        assert ranks[0].batch_for_step(step) + ranks[1].batch_for_step(step) == batches[step]


# --- running -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-dsnet", "tiny-distill-dsnet"])
def test_exact_resume_reproduces_the_uninterrupted_run(tmp_path, teacher_checkpoint, name):
    # the distillation run also unfreezes its teacher for the last step (co-training), so the
    # checkpoint of step 2 must carry adapters and teacher
    overrides = ({"teacher.checkpoint": str(teacher_checkpoint),
                  "distill.co_training": {"start_step": 3, "lr": 1e-3}} if "distill" in name else {})
    straight = run_training(name, tmp_path / "straight", overrides=overrides)
    assert straight.name == "final.pt"
    stopped = run_training(name, tmp_path / "resumed", overrides=overrides, max_steps=2)
    assert stopped.name == "last.pt" and load_checkpoint(stopped)["step"] == 2
    resumed = run_training(name, tmp_path / "resumed", overrides=overrides, resume=True)

    expected, actual = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [row["step"] for row in actual] == ["1", "2", "3", "4"]
    for a, b in zip(expected, actual, strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]  # bit-identical floats
    assert math.isfinite(float(expected[-1]["loss"]))
    state_a, state_b = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    model = load_model(resumed)
    assert sum(p.numel() for p in model.parameters()) > 0 and not model.training
    if "distill" in name:  # progressive stages: cost and disparity join at step 2
        assert expected[1]["loss.cost"] == "" and float(expected[2]["loss.cost"]) > 0
        assert expected[2]["loss.teacher_ground_truth"] == "" and float(expected[3]["loss.teacher_ground_truth"]) > 0
        last = {k: float(v) for k, v in expected[3].items() if v}
        weighted = sum(last[k] * last[k.replace("loss.", "weight.")] for k in last if k.startswith("loss."))
        assert last["loss"] == pytest.approx(weighted, rel=1e-5)
        teacher = load_model(teacher_checkpoint).state_dict()
        trainer = Trainer(load_recipe(name, overrides), tmp_path / "resumed")
        trainer.restore(tmp_path / "resumed" / "last.pt")
        trained = trainer.objective.teacher.state_dict()
        assert any(not torch.equal(teacher[k], trained[k]) for k in teacher)


def test_resume_refuses_a_changed_recipe(tmp_path):
    run_training("tiny-dsnet", tmp_path, max_steps=2)
    with pytest.raises(RecipeError, match="train.optimizer.lr"):
        run_training("tiny-dsnet", tmp_path, resume=True, overrides={"train.optimizer.lr": 0.5})


def test_missing_teacher_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere/teacher.pt"):
        run_training("tiny-distill-dsnet", tmp_path, overrides={"teacher.checkpoint": "nowhere/teacher.pt"})


class PoisonedPairs(Dataset):
    """Constant training items; the listed indices carry NaN images."""

    def __init__(self, size: int, poisoned: set[int]) -> None:
        self.size, self.poisoned = size, poisoned

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        left = torch.rand(3, 32, 64, generator=torch.Generator().manual_seed(index))
        if index in self.poisoned:
            left[:, 5, 5] = float("nan")
        return {"left": left, "right": left.roll(-2, dims=-1), "disparity": torch.full((32, 64), 2.0),
                "valid": torch.ones(32, 64, dtype=torch.bool)}


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path):
    recipe = load_recipe("tiny-dsnet", {"train.batch_size": 1})
    trainer = Trainer(recipe, tmp_path / "one", dataset=PoisonedPairs(4, poisoned={2}))
    buffers = {k: v.clone() for k, v in trainer.student.named_buffers()}
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.run()
    rows = read_log(tmp_path / "one")
    assert sum(int(r["skipped"]) for r in rows) == 1
    state = trainer.student.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(buffers[k], v) for k, v in trainer.student.named_buffers())

    # every item poisoned: the run stops after max_nonfinite_steps (3) steps in a row
    trainer = Trainer(recipe, tmp_path / "all", dataset=PoisonedPairs(4, poisoned={0, 1, 2, 3}))
    buffers = {k: v.clone() for k, v in trainer.student.named_buffers()}
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="3 consecutive"):
        trainer.run()
    assert [r["skipped"] for r in read_log(tmp_path / "all")] == ["1", "1", "1"]
    # the bad batches left the batch-norm statistics as they were
    assert all(torch.equal(buffers[k], v) for k, v in trainer.student.named_buffers())


def test_ddp_world_size_two_on_cpu(tmp_path, monkeypatch):
    """Two ranks under gloo, set up as torchrun sets them up (rank 0 here, rank 1 a real
    second process): each trains on its shard, the replicas stay identical, rank 0 writes the
    log and checkpoints."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script = ("import sys, torch; from stereo_kd_core.train import Trainer, load_recipe; "
              "trainer = Trainer(load_recipe('tiny-dsnet', {'train.batch_size': 1}), sys.argv[1]); "
              "trainer.run(); torch.save(dict(trainer.student.named_parameters()), sys.argv[2])")
    rank1 = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "rank1.pt")],
        env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1", "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True)
    for key, value in {**env, "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    try:
        trainer = Trainer(load_recipe("tiny-dsnet", {"train.batch_size": 1}), tmp_path / "run")
        trainer.run()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _, stderr = rank1.communicate(timeout=120)
    assert rank1.returncode == 0, stderr[-2000:]
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    final = load_checkpoint(tmp_path / "run" / "final.pt")
    assert final["step"] == 4
    # gradients are averaged, so the weights agree on both ranks and with the checkpoint
    # (batch-norm statistics are rank 0's, broadcast by DDP at each forward)
    rank1_parameters = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key, value in trainer.student.named_parameters():
        assert torch.equal(rank1_parameters[key], value) and torch.equal(final["state_dict"][key], value), key
    initial = build_model(final["config"]).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in final["state_dict"].items())


def test_a_killed_run_resumes_with_the_exact_next_losses(tmp_path):
    """SIGKILL a real training process mid-run, resume from its last checkpoint: every logged
    loss after the checkpoint equals the uninterrupted run's, bit for bit."""
    import signal
    import time

    overrides = {"train.steps": 24, "train.checkpoint_every": 4, "train.log_every": 1}
    reference = tmp_path / "reference"
    run_training("tiny-dsnet", reference, overrides=overrides)
    expected = {row["step"]: row["loss"] for row in read_log(reference)}

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "stereo_kd_core", "train", "tiny-dsnet", "--out", str(killed)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    # the same thread count as this process: CPU kernels are bit-reproducible only at equal threads
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "last.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    checkpoint_step = load_checkpoint(killed / "last.pt")["step"]
    assert 0 < checkpoint_step < 24

    run_training("tiny-dsnet", killed, resume=True, overrides=overrides)
    resumed = {row["step"]: row["loss"] for row in read_log(killed)}
    assert set(resumed) == set(expected)
    for step in range(checkpoint_step + 1, 25):
        assert resumed[str(step)] == expected[str(step)], f"step {step} differs after resume"
