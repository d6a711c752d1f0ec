"""One trainer for every recipe: supervised training, distillation and adaptation are
configurations of one loop and one objective (`stereo_kd_core.distill.objective`), whose batches
may mix samples of different sources (ground truth, a teacher's pseudo-labels).

The run is a pure function of (recipe, step): the batch of step s is drawn from a permutation
seeded by (seed, epoch), each item's augmentation is seeded by (seed, epoch, index), the step's
own random numbers (dropout) by (seed, step, rank), and the learning rate is a closed-form
function of s. A run
resumed from the checkpoint of step k therefore computes exactly the losses an uninterrupted
run computes from step k on, without replaying data or restoring generator states.

Files in out_dir: last.pt (training state, every checkpoint_every steps and at exit),
final.pt (student weights and config once the recipe's steps are done), log.csv, recipe.yaml,
and TensorBoard events when tensorboard is installed.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from stereo_kd_core.checkpoint import load_checkpoint, load_model, load_state_dict_strict, save_checkpoint
from stereo_kd_core.data.mixed import collate_mixed
from stereo_kd_core.distill import (
    PHOTOMETRIC_TERM,
    CachedTeacherDistiller,
    Distiller,
    SupervisedObjective,
    TrainingObjective,
)
from stereo_kd_core.models import build_model, default_config
from stereo_kd_core.models.narrow import narrow_state_dict, widths
from stereo_kd_core.train.recipe import RecipeError, adapt_internal_source, load_recipe

LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "final.pt"
LOG_FILE = "log.csv"
ADAPT_INTERNAL_TERMS = ("features", "volume", "cost")  # adapt: the teacher's disparity is the pseudo-label
_SEED_STRIDE = 1_000_003  # keeps (seed, step, slot) -> seed one-to-one for any realistic run


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


def derived_seed(seed: int, step: int, slot: int = 0) -> int:
    return (seed * _SEED_STRIDE + step) * 4099 + slot


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- learning rate -----------------------------------------------------------------------
def lr_factor(schedule: Mapping, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based).

    one_cycle: cosine warm-up from 1/25 to 1 over pct_start of the run, then cosine decay to
    1/(25 * 1e4) (the usual one-cycle shape). multistep: gamma ** (milestones passed).
    """
    if schedule["name"] == "multistep":
        return schedule["gamma"] ** sum(step >= m for m in schedule["milestones"])
    start, end = 1.0 / 25.0, 1.0 / (25.0 * 1e4)
    warmup = max(1, int(schedule.get("pct_start", 0.05) * total_steps))

    def cosine(low: float, high: float, fraction: float) -> float:  # high -> low as fraction 0 -> 1
        return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * min(fraction, 1.0)))

    if step < warmup:
        return cosine(1.0, start, step / warmup)
    return cosine(end, 1.0, (step - warmup) / max(1, total_steps - 1 - warmup))


def freeze_batchnorm(network: nn.Module) -> int:
    """Put every batch-norm layer of `network` in eval mode (running statistics stay as they
    are; the affine weights still train); returns how many. For fine-tuning on a few frames,
    whose statistics are not the world's."""
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.amp "auto" -> bf16 on CUDA with bf16 and on CPUs that compute it natively (AMX /
    AVX-512 BF16, as inference's precision "auto"), fp16 on older CUDA, else none."""
    from stereo_kd_core.estimator import cpu_has_native_bf16

    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"


# --- data --------------------------------------------------------------------------------
class StepBatchSampler(Sampler):
    """Yields, for each step from start_step to end_step, this rank's list of (epoch, index).

    Sample position p = step * global_batch + slot runs through epochs of seeded
    permutations: epoch p // N uses permutation(seed, epoch). Rank r takes slots
    r*B .. (r+1)*B-1 of the global batch of size world_size * B.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, start_step: int,
                 end_step: int, rank: int = 0, world_size: int = 1) -> None:
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.start_step, self.end_step = start_step, end_step
        self.rank, self.world_size = rank, world_size
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._permutations = {epoch: torch.randperm(self.dataset_size, generator=generator)}
        return self._permutations[epoch]

    def batch_for_step(self, step: int) -> list[tuple[int, int]]:
        global_batch = self.batch_size * self.world_size
        batch = []
        for slot in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            epoch, offset = divmod(step * global_batch + slot, self.dataset_size)
            batch.append((epoch, int(self._permutation(epoch)[offset])))
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            yield self.batch_for_step(step)

    def __len__(self) -> int:
        return self.end_step - self.start_step


class EpochIndexedDataset(Dataset):
    """Items addressed by (epoch, index): the epoch is set on the training set before each read,
    so its augmentation (seeded by seed, epoch, index) does not depend on loader workers or
    on where a run was resumed."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        item = self.base[index]
        # left, right, disparity, valid, weight, source and any other per-sample tensor
        return {name: value for name, value in item.items() if isinstance(value, torch.Tensor)}


def build_training_dataset(recipe: Mapping) -> Dataset:
    """The recipe's training set with crops and augmentation (stereo_kd_core.data)."""
    from stereo_kd_core.data import AugmentConfig, TrainingDataset, open_dataset

    spec = dict(recipe["data"]["train"])
    name, root = spec.pop("name"), spec.pop("root", None)
    try:
        base = open_dataset(name, root, **spec)
    except TypeError as exc:  # an argument the data set does not take
        raise RecipeError(f"data.train ({name}): {exc}") from None
    try:
        augment = AugmentConfig(**recipe["data"]["augment"])
    except TypeError as exc:
        raise RecipeError(f"data.augment: {exc}") from None
    return TrainingDataset(base, crop_size=tuple(recipe["data"]["crop"]), augment=augment,
                           max_disparity=recipe["model"]["max_disparity"], seed=recipe["train"]["seed"])


# --- distributed ---------------------------------------------------------------------------
def _distributed_setup() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group when torchrun started us
    (WORLD_SIZE > 1: NCCL on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return rank, world_size, device


def model_config(recipe: Mapping) -> dict:
    """The student's config: the architecture's defaults updated by the recipe's model keys."""
    spec = dict(recipe["model"])
    config = default_config(spec["arch"], spec["max_disparity"])
    unknown = set(spec) - set(config)
    if unknown:
        raise RecipeError(f"model: {spec['arch']} has no arguments {sorted(unknown)}; "
                          f"it takes {', '.join(sorted(set(config) - {'arch'}))}")
    config.update(spec)
    return config


# --- the trainer -------------------------------------------------------------------------
class Trainer:
    """Builds model, objective, optimizer and data from a recipe and runs the loop.

    dataset: the training set (None: the recipe's data.train); teacher: a teacher network the
    caller already holds (adapt's; a distillation recipe names its own)."""

    def __init__(self, recipe: Mapping | str, out_dir: str | os.PathLike,
                 dataset: Dataset | None = None, teacher: nn.Module | None = None) -> None:
        self.recipe = load_recipe(recipe)
        self._given_teacher = teacher
        self.out_dir = Path(out_dir)
        train = self.recipe["train"]
        self.rank, self.world_size, self.device = _distributed_setup()
        self.seed = int(train["seed"])
        self.total_steps = int(train["steps"])
        # called with (step, student) after every checkpoint is written (adapt's judge scores it)
        self.on_checkpoint: Callable[[int, nn.Module], None] | None = None

        seed_everything(self.seed)  # same initial weights on every rank
        self.config = model_config(self.recipe)
        student = build_model(self.config).to(self.device)
        self.objective: TrainingObjective = self.build_objective(student)
        self.student = student
        crop = self.recipe["data"]["crop"]
        for role, model in self._networks():
            if crop[0] % model.stride or crop[1] % model.stride:
                raise RecipeError(f"data.crop {crop} must be a multiple of the {role}'s stride {model.stride}")

        self.optimizer = self._build_optimizer()
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        if train["init_from"] is not None:
            self._init_student(train["init_from"])
        amp = resolve_amp(train["amp"], self.device)
        # bf16 autocast runs on the CPU too (AMX / AVX-512 BF16 units: 2.6x per step on our
        # Xeon); fp16 autocast needs CUDA
        if amp == "fp16" and self.device.type != "cuda":
            warnings.warn("train.amp 'fp16' needs CUDA; training in fp32 on the CPU (use bf16)", stacklevel=2)
            amp = "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        self.dataset = dataset if dataset is not None else build_training_dataset(self.recipe)
        if len(self.dataset) == 0:
            raise RecipeError("the training set is empty")
        self.wrapped: nn.Module = self.objective
        self._wrapped_for_co_training: bool | None = None
        self.nonfinite_streak = 0  # consecutive skipped steps

    def _init_student(self, source: str) -> None:
        """Warm start: the student's weights from a checkpoint path or a registry name. The
        architecture must match the recipe's (strict keys; a refinement the checkpoint lacks
        starts as the identity); optimizer state starts fresh."""
        from stereo_kd_core.registry import resolve_shipped

        path, sha256 = (Path(source), None) if Path(source).is_file() else resolve_shipped(source)
        checkpoint = load_checkpoint(path, expected_sha256=sha256)
        stored = checkpoint["config"]
        if stored.get("arch") != self.config.get("arch"):
            raise RecipeError(f"train.init_from {source}: a {stored.get('arch')} checkpoint cannot start a "
                              f"{self.config.get('arch')} student")
        state = checkpoint["state_dict"]
        refinement = getattr(self.student, "refinement", None)
        has_refinement = bool(stored.get("refine_channels"))
        stored_widths = widths(stored)
        if not has_refinement:  # a refinement the checkpoint lacks is added below, not narrowed
            stored_widths["refine_channels"] = self.config.get("refine_channels")
        if stored_widths != widths(self.config):
            # A wider network of the same architecture starts a narrower student: the first
            # channels of every width (stereo_kd_core.models.narrow).
            shapes = {key: value.shape for key, value in self.student.state_dict().items()
                      if has_refinement or not key.startswith("refinement.")}
            state = narrow_state_dict(state, stored, self.config, shapes)
            print(f"train.init_from {source}: narrowed from {widths(stored)} to {widths(self.config)} "
                  "(the first channels of every width)", file=sys.stderr)
        if refinement is not None and not has_refinement:
            # A refinement added to a network trained without one starts as the identity (its
            # last layer is zero): every other key still loads strictly.
            state = {**state, **{f"refinement.{key}": value for key, value in refinement.state_dict().items()}}
            print(f"train.init_from {source}: the refinement is new and starts as the identity", file=sys.stderr)
        load_state_dict_strict(self.student, state, source=f"train.init_from {source}")

    def build_objective(self, student: nn.Module) -> TrainingObjective:
        """The loss the run minimises, one objective configured by the recipe: adaptation (an
        `adapt:` section), distillation (a `teacher:`, live or cached), else supervised."""
        loss = self.recipe["loss"]
        kind, output_weights = loss["kind"], tuple(loss["output_weights"])
        if "adapt" in self.recipe:
            return self._adapt_objective(student, kind, output_weights)
        if "teacher" in self.recipe and self.recipe["teacher"].get("cached"):
            return CachedTeacherDistiller(student, self.recipe["distill"], kind, output_weights)
        if "teacher" in self.recipe:
            teacher = load_model(self.recipe["teacher"]["checkpoint"], device=self.device)
            return Distiller(student, teacher, self.recipe["distill"], kind, output_weights)
        return SupervisedObjective(student, kind, output_weights)

    def _adapt_objective(self, student: nn.Module, kind: str, output_weights: tuple[float, ...]) -> TrainingObjective:
        """`stereo-kd adapt`: one label term over pseudo-labels and replayed ground truth (the worst
        `drop_worst` of the pseudo-labelled pixels per batch ignored), optional photometric
        self-supervision on the recorded frames, and the teacher network's internal points."""
        adapt = self.recipe["adapt"]
        teacher, internal = self._given_teacher, adapt["internal"]
        cached = adapt_internal_source(adapt) == "cache"
        if internal and (teacher is not None or cached):
            unknown = set(internal) - {*ADAPT_INTERNAL_TERMS, "weighting", "stages"}
            if unknown:
                raise RecipeError(f"adapt.internal: unknown keys {sorted(unknown)}; takes "
                                  f"{', '.join(ADAPT_INTERNAL_TERMS)}, weighting, stages")
        else:  # no live teacher and no cache: the labels alone
            teacher, internal = None, None
        fixed = {"labels": 1.0}
        if adapt["photometric"] > 0:
            fixed[PHOTOMETRIC_TERM] = float(adapt["photometric"])
        return TrainingObjective(student, internal, None if teacher is None else teacher.to(self.device),
                                 kind, output_weights, fixed=fixed, drop_worst=adapt["drop_worst"],
                                 smoothness=adapt["smoothness"])

    def _networks(self) -> list[tuple[str, nn.Module]]:
        networks = [("student", self.student)]
        if self.objective.teacher is not None:
            networks.append(("teacher", self.objective.teacher))
        return networks

    def _build_optimizer(self) -> torch.optim.Optimizer:
        spec = self.recipe["train"]["optimizer"]
        trainable = [p for name, p in self.objective.named_parameters() if not name.startswith("teacher.")]
        groups = [{"params": trainable, "lr": float(spec["lr"])}]
        if self.objective.co_training_lr is not None:
            # teacher parameters have no gradient (and so are left alone) until co-training
            groups.append({"params": list(self.objective.teacher.parameters()),
                           "lr": self.objective.co_training_lr})
        optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec["name"]]
        return optimizer_class(groups, lr=float(spec["lr"]), betas=tuple(spec["betas"]),
                               weight_decay=float(spec["weight_decay"]))

    def _wrap_for_step(self, step: int) -> None:
        """DDP wrapping, redone when co-training changes which parameters train."""
        co_training = self.objective.co_training_active(step)
        if self.world_size == 1 or co_training == self._wrapped_for_co_training:
            return
        self.wrapped = nn.parallel.DistributedDataParallel(
            self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.objective.teacher is not None)
        self._wrapped_for_co_training = co_training

    # --- checkpoints ---------------------------------------------------------------------
    def save(self, step: int, path: Path) -> None:
        extra = {"recipe": self.recipe, "scaler": self.scaler.state_dict(),
                 "objective": self.objective.auxiliary_state_dict(),
                 "nonfinite_streak": self.nonfinite_streak}
        save_checkpoint(path, self.student, self.config, optimizer=self.optimizer, step=step, extra=extra)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, self.student)

    def restore(self, path: Path) -> int:
        checkpoint = load_checkpoint(path)
        stored = checkpoint["extra"].get("recipe")
        if stored != self.recipe:
            changed = sorted(_differing_keys(stored or {}, self.recipe))
            raise RecipeError(f"cannot resume from {path}: the recipe differs at {', '.join(changed)}")
        load_state_dict_strict(self.student, checkpoint["state_dict"], source=f"checkpoint {path}")
        self.objective.load_auxiliary_state_dict(checkpoint["extra"]["objective"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["extra"]["scaler"])
        self.nonfinite_streak = int(checkpoint["extra"]["nonfinite_streak"])
        return int(checkpoint["step"])

    # --- logging -------------------------------------------------------------------------
    def _log_columns(self) -> list[str]:
        terms = self.objective.terms
        return ["step", "loss", "lr", "grad_norm", "skipped", "seconds",
                *(f"loss.{t}" for t in terms), *(f"weight.{t}" for t in terms if len(terms) > 1)]

    def open_log(self, start_step: int):
        """CSV log, truncated to the rows up to start_step when resuming."""
        path = self.out_dir / LOG_FILE
        columns = self._log_columns()
        rows = []
        if start_step > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
        f = open(path, "w", newline="")  # noqa: SIM115 - closed at the end of run()
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return f, writer

    @staticmethod
    def _tensorboard(out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(out_dir / "tensorboard"))

    # --- the loop ------------------------------------------------------------------------
    def run(self, resume: bool = False, max_steps: int | None = None) -> Path:
        """Train up to the recipe's steps (or stop after max_steps steps in total); returns
        final.pt when the recipe's steps are done, else last.pt."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start_step = 0
        last = self.out_dir / LAST_CHECKPOINT
        if resume:
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {last}")
            start_step = self.restore(last)
        end_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        train = self.recipe["train"]
        is_main = self.rank == 0
        if is_main:
            self.write_recipe()
        loader = self.batch_loader(start_step, end_step)
        log_file, log = self.open_log(start_step) if is_main else (None, None)
        board = self._tensorboard(self.out_dir) if is_main else None
        progress = tqdm(total=self.total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not (is_main and sys.stderr.isatty()))
        self.enter_training()
        done = start_step
        try:
            for step, batch in enumerate(loader, start=start_step):
                record = self.timed_step(step, batch)
                done = step + 1
                if is_main and (done % train["log_every"] == 0 or done == end_step or record["skipped"]):
                    log.writerow(record)
                    log_file.flush()
                    if board is not None:
                        for key, value in record.items():
                            if key != "step":
                                board.add_scalar(key, value, done)
                self.check_nonfinite_streak(done)
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4g}")
                if is_main and done % train["checkpoint_every"] == 0 and done < end_step:
                    self.save(done, last)
        except KeyboardInterrupt:  # Ctrl-C: keep what was done; --resume continues exactly from here
            if is_main:
                self.save(done, last)
            raise
        finally:
            progress.close()
            if log_file is not None:
                log_file.close()
            if board is not None:
                board.close()
        if is_main:
            self.save(done, last)
        if done >= self.total_steps:
            result = self.save_final(done) if is_main else self.out_dir / FINAL_CHECKPOINT
        else:
            result = last
        if self.world_size > 1:
            dist.barrier()
        return result

    # --- the pieces of the loop (run, and side_by_side's several trainers on one stream) -----
    def write_recipe(self) -> None:
        """recipe.yaml in the output folder: what `stereo-kd train` of it reproduces."""
        with open(self.out_dir / "recipe.yaml", "w") as f:
            yaml.safe_dump(self.recipe, f, sort_keys=False)

    def batch_loader(self, start_step: int, end_step: int) -> DataLoader:
        """The batches of steps start_step..end_step of this recipe's stream (this rank's share)."""
        sampler = StepBatchSampler(len(self.dataset), int(self.recipe["train"]["batch_size"]), self.seed,
                                   start_step, end_step, self.rank, self.world_size)
        return DataLoader(EpochIndexedDataset(self.dataset), batch_sampler=sampler, collate_fn=collate_mixed,
                          num_workers=int(self.recipe["data"]["num_workers"]),
                          pin_memory=self.device.type == "cuda")

    def enter_training(self) -> None:
        """Training mode; with train.freeze_batchnorm, the batch-norm statistics stay the start's
        (fine-tuning on few frames)."""
        self.objective.train()
        if self.recipe["train"]["freeze_batchnorm"]:
            freeze_batchnorm(self.student)

    def timed_step(self, step: int, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """train_step, with its seconds in the record."""
        started = time.perf_counter()
        record = self.train_step(step, batch)
        record["seconds"] = time.perf_counter() - started
        return record

    def check_nonfinite_streak(self, done: int) -> None:
        """Raise NonFiniteLossError once train.max_nonfinite_steps steps in a row were skipped."""
        limit = self.recipe["train"]["max_nonfinite_steps"]
        if self.nonfinite_streak >= limit:
            raise NonFiniteLossError(f"{self.out_dir.name}: {self.nonfinite_streak} consecutive steps with a "
                                     f"non-finite loss or gradient (train.max_nonfinite_steps = {limit}); "
                                     f"stopped at step {done}")

    def save_final(self, done: int) -> Path:
        """final.pt: the student's weights and config, no training state."""
        final = self.out_dir / FINAL_CHECKPOINT
        save_checkpoint(final, self.student, self.config, step=done, extra={"recipe": self.recipe})
        return final

    def train_step(self, step: int, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on `batch`; a NaN/inf loss or gradient skips it (and restores
        the batch-norm statistics the bad batch touched) and lengthens `nonfinite_streak`."""
        self.objective.set_step(step)
        self._wrap_for_step(step)
        factor = lr_factor(self.recipe["train"]["schedule"], step, self.total_steps)
        # the schedule drives the trainable group; a co-trained teacher keeps its small lr
        self.optimizer.param_groups[0]["lr"] = self.base_lrs[0] * factor
        torch.manual_seed(derived_seed(self.seed, step, 1_000 + self.rank))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        buffers = [b.detach().clone() for b in self.objective.buffers()]

        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, logs = self.wrapped(batch, step)
        record: dict[str, Any] = {"step": step + 1, "lr": self.optimizer.param_groups[0]["lr"],
                                  "loss": float(loss.detach()), "skipped": 0, "grad_norm": float("nan")}
        record.update({k: float(v) for k, v in logs.items()})
        self.optimizer.zero_grad(set_to_none=True)
        if self._all_ranks_finite(record["loss"]):
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            clip = self.recipe["train"]["grad_clip"]
            grad_norm = nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
            record["grad_norm"] = float(grad_norm)
            # with fp16 the scaler owns inf gradients (it skips the step and lowers its scale)
            if math.isfinite(record["grad_norm"]) or self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.nonfinite_streak = 0
                return record
        record["skipped"] = 1
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.objective.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        self.nonfinite_streak += 1
        limit = self.recipe["train"]["max_nonfinite_steps"]
        warnings.warn(f"step {step + 1}: non-finite loss {record['loss']} or gradient norm "
                      f"{record['grad_norm']}; step skipped ({self.nonfinite_streak} in a row, "
                      f"stopping at {limit})", RuntimeWarning, stacklevel=2)
        return record

    def _all_ranks_finite(self, value: float) -> bool:
        """Whether `value` is finite on every rank (ranks must agree to skip a step together)."""
        finite = math.isfinite(value)
        if self.world_size > 1:
            flag = torch.tensor(float(finite), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        return finite


def _differing_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys: set[str] = set()
        for key in set(a) | set(b):
            keys |= _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return set() if a == b else {prefix.rstrip(".")}


def run_training(recipe: Mapping | str, out_dir: str | os.PathLike, resume: bool = False,
                 overrides: Mapping[str, Any] | None = None, max_steps: int | None = None) -> Path:
    """Train (supervised, or distillation when the recipe has a `teacher:`) and return the
    final checkpoint's path (last.pt when max_steps stopped the run early)."""
    joined_here = not (dist.is_available() and dist.is_initialized())
    try:
        return Trainer(load_recipe(recipe, overrides), out_dir).run(resume=resume, max_steps=max_steps)
    finally:
        if joined_here and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
