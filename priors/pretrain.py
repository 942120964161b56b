"""Pre-training loop behind ``ctrecon pretrain`` (library: no printing; progress through a callback).

AdamW (lr 1e-4, weight decay 0.05, betas 0.9/0.95; no decay on norms, biases, tokens and other 1-D
or token parameters), linear warm-up then cosine decay to 0 (per optimizer step), gradient clipping
at 1.0, bf16 autocast on CUDA, gradient accumulation, and DDP when launched by torchrun (NCCL on
GPUs, gloo on CPUs). ``batch`` is the global number of crops per optimizer step, split over
processes and accumulation micro-steps; with the per-sample crops and masks of :mod:`priors.data`
the run's data, masks and so its loss curve do not depend on the number of processes.

Output folder: ``checkpoint.pt`` (resumable training state: model, optimizer, scheduler, scaler,
step, per-process RNG states, data order), ``prior.pt`` (weights + metadata, what ``--prior`` takes),
``encoder_monai.pt`` (the encoder for MONAI's ViT/UNETR, see :func:`priors.checkpoints.export_encoder`),
``log.csv`` (step, loss, lr, seconds, samples/s), ``previews/step_NNNNNNN.png`` (input, visible
patches and reconstruction of a fixed crop), ``config.json``. Checkpoints are written atomically every
``checkpoint_every`` steps and at the end; a run resumed from step s reproduces the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ctrecon.core.errors import InputError

from priors.checkpoints import export_encoder, load_state, prior_metadata, save_prior, save_state
from priors.data import CropDataset, DataConfig, StepBatches, describe_volumes, find_volumes
from priors.model import ModelConfig, build_model, random_patch_mask

__all__ = ["TrainConfig", "pretrain", "parameter_groups", "lr_factor"]

LOG_COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_s")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``warmup_steps`` None → 2 % of ``steps`` (the paper: 2000 of 100 000)."""

    steps: int = 100_000
    batch: int = 8
    accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    warmup_steps: int | None = None
    clip_grad: float = 1.0
    precision: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 10
    preview_every: int = 1000
    workers: int = 2
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.steps < 1 or self.batch < 1 or self.accum < 1:
            raise InputError("steps, batch and accum must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if min(self.checkpoint_every, self.log_every, self.preview_every) < 0 or self.workers < 0:
            raise InputError("checkpoint_every, log_every, preview_every and workers must be >= 0")

    @property
    def warmup(self) -> int:
        return max(1, round(0.02 * self.steps)) if self.warmup_steps is None else int(self.warmup_steps)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: decay on weight matrices/kernels; none on norms, biases and token/embedding parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim <= 1 or leaf in ("cls_token", "query_tokens", "mask_token", "child_tokens") or "embed" in leaf:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _LossModule(nn.Module):
    """Wraps a model so that DDP sees the loss computation as ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, crops, mask, inputs=None):
        return self.model.loss(crops, mask, inputs)


@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _distributed(device: torch.device) -> _Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), device, owns)


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _gather_rng(dist_ctx: _Dist) -> list:
    """Every process's RNG state (on the main process; others get an empty list)."""
    state = _rng_state(dist_ctx.device)
    if dist_ctx.world == 1:
        return [state]
    import torch.distributed as dist

    states = [None] * dist_ctx.world if dist_ctx.main else None
    dist.gather_object(state, states, dst=0)
    return states if dist_ctx.main else []


def _read_log(path: Path, up_to_step: int) -> list:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["step"]) <= up_to_step]


def _write_log(path: Path, rows: list):
    from ctrecon.core.io import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _save_preview(path: Path, model: nn.Module, crop: torch.Tensor, mask: torch.Tensor, step: int, loss: float):
    """PNG of the central axial and coronal slices: input, visible patches, reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrecon.core.io import atomic_output

    from priors.model import patch_mask_to_voxels

    cfg = model.cfg
    was_training = model.training
    model.eval()
    recon = model.reconstruct(crop, mask)[0, 0].cpu()
    model.train(was_training)
    volume = crop[0, 0].float().cpu()
    visible = volume * ~patch_mask_to_voxels(mask, cfg.patch_size, cfg.grid)[0, 0].cpu()
    mid = cfg.crop_size // 2
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, take in enumerate((lambda v: v[mid], lambda v: v[:, mid].flip(0))):
        for col, (title, image) in enumerate((("input", volume), ("visible patches", visible),
                                              ("reconstruction", recon))):
            axes[row, col].imshow(take(image).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            axes[row, col].set_title(f"{title} ({'axial' if row == 0 else 'coronal'})", fontsize=9)
            axes[row, col].axis("off")
    fig.suptitle(f"{cfg.architecture}, step {step}, loss {loss:.5f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png", dpi=80)
    plt.close(fig)


def pretrain(data, out, model_cfg: ModelConfig, data_cfg: DataConfig = None, train_cfg: TrainConfig = None, *,
             resume: bool = False, device="cpu", cache_dir=None, progress=None) -> dict:
    """Pre-train a prior on the CT volumes under ``data``; write checkpoints, log and previews to ``out``.

    ``resume``: continue from ``out/checkpoint.pt`` when it exists (the model config and batch must
    match; ``steps`` may grow). Without ``resume`` an existing checkpoint in ``out`` is an error.
    ``progress(step, total_steps, record)`` is called on the main process after every step with a
    dict of loss, lr, seconds. Returns a summary dict (paths, steps, last loss).
    """
    data_cfg = dataclasses.replace(data_cfg or DataConfig(), crop_size=model_cfg.crop_size)
    train_cfg = train_cfg or TrainConfig()
    device = torch.device(device)
    out = Path(out)
    checkpoint_path, prior_path, log_path = out / "checkpoint.pt", out / "prior.pt", out / "log.csv"
    if checkpoint_path.exists() and not resume:
        raise InputError(f"{out} already holds a training checkpoint; pass --resume or choose another --out")
    files, layout = find_volumes(data)
    description = describe_volumes(data, files, layout)

    ctx = _distributed(device)
    earlier = set(os.listdir(out)) if out.is_dir() else None  # what a failure before a checkpoint leaves alone
    try:
        return _train(ctx, files, description, out, model_cfg, data_cfg, train_cfg, resume, cache_dir, progress,
                      checkpoint_path, prior_path, log_path)
    except Exception:
        if ctx.main and not checkpoint_path.exists():  # nothing to resume from: take back what this run wrote
            _remove_new_entries(out, earlier)
        raise
    finally:
        if ctx.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _remove_new_entries(out: Path, earlier: set | None) -> None:
    """Remove the entries of ``out`` not in ``earlier`` (its listing before the run), and ``out`` itself when
    the run created it (``earlier`` None) and it is left empty."""
    if not out.is_dir():
        return
    for name in set(os.listdir(out)) - (earlier or set()):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if earlier is None and not any(out.iterdir()):
        out.rmdir()


def _train(ctx, files, description, out, model_cfg, data_cfg, train_cfg, resume, cache_dir, progress,
           checkpoint_path, prior_path, log_path):
    device = ctx.device
    torch.manual_seed(train_cfg.seed)  # identical initial weights on every process
    model = build_model(model_cfg).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, train_cfg.weight_decay), lr=train_cfg.lr,
                                  betas=train_cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train_cfg.steps, train_cfg.warmup))
    autocast, precision = _autocast(device, train_cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    torch.manual_seed(train_cfg.seed + 1 + ctx.rank)  # per-process stream (stochastic depth)

    start_step, resumed = 0, False
    if resume and checkpoint_path.exists():
        state = load_state(checkpoint_path, map_location=device)
        saved = state["metadata"]
        if saved["config"] != model_cfg.to_dict():
            raise InputError(f"{checkpoint_path} was trained with a different model config; resume with the same "
                             "--config and --model")
        if saved["training"]["batch"] != train_cfg.batch or saved["training"]["seed"] != train_cfg.seed:
            raise InputError(f"{checkpoint_path} was trained with batch {saved['training']['batch']} and seed "
                             f"{saved['training']['seed']}; resume with the same values")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step, resumed = int(state["step"]), True
        if len(state["rng"]) == ctx.world:
            _set_rng_state(state["rng"][ctx.rank], device)
        del state

    trained = _LossModule(model)
    if ctx.world > 1:
        trained = nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None)
    dataset = CropDataset(files, data_cfg, seed=train_cfg.seed, cache_dir=cache_dir)
    sampler = StepBatches(start_step, train_cfg.steps, train_cfg.batch, ctx.rank, ctx.world, train_cfg.accum)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=train_cfg.workers,
                                         pin_memory=device.type == "cuda", generator=torch.Generator(),
                                         persistent_workers=False)
    fewest_masked = 1 if data_cfg.corruption == "none" else 0   # the clean loss needs a masked patch
    preview_item = dataset[0] if ctx.main and train_cfg.preview_every else None

    train_dict = {**train_cfg.to_dict(), "precision": precision, "processes": ctx.world}
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"model": model_cfg.to_dict(), "data": data_cfg.to_dict(), "train": train_dict,
             "training_data": description}, indent=2))
        rows = _read_log(log_path, start_step) if resumed else []
        _write_log(log_path, rows)

    def metadata(step):
        return prior_metadata(model_cfg, data_cfg, description, step, train_dict)

    def checkpoint(step):
        rng = _gather_rng(ctx)
        if ctx.main:
            save_state(checkpoint_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                         "step": step, "rng": rng,
                                         "data_order": {"seed": train_cfg.seed, "next_item": step * train_cfg.batch,
                                                        "crops_per_volume": data_cfg.crops_per_volume}},
                       metadata(step))
            save_prior(prior_path, model, metadata(step))
            export_encoder(model, out / "encoder_monai.pt", metadata(step))

    model.train()
    batches = iter(loader)
    started = time.perf_counter()
    last_loss = float("nan")
    for step in range(start_step, train_cfg.steps):
        step_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        total = torch.zeros((), device=device)
        n_masked = model_cfg.masked_patches(train_cfg.seed, step, fewest_masked)
        for micro in range(train_cfg.accum):
            batch = next(batches)
            crops = batch["image"].to(device, non_blocking=True)
            inputs = batch["input"].to(device, non_blocking=True) if "input" in batch else None  # corrupted crops
            mask = random_patch_mask(batch["seed"].tolist(), model_cfg.n_patches, n_masked, device)
            sync = ctx.world == 1 or micro == train_cfg.accum - 1
            with (contextlib.nullcontext() if sync else trained.no_sync()):
                with autocast:
                    loss = trained(crops, mask, inputs)
                scaler.scale(loss / train_cfg.accum).backward()
            total += loss.detach() / train_cfg.accum
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), train_cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ctx.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            total /= ctx.world
        last_loss = float(total)
        done = step + 1
        seconds = time.perf_counter() - step_start
        record = {"step": done, "loss": last_loss, "lr": lr, "seconds": seconds,
                  "samples_per_s": train_cfg.batch / seconds}
        if ctx.main:
            if train_cfg.log_every and (done % train_cfg.log_every == 0 or done == train_cfg.steps):
                with open(log_path, "a", newline="") as handle:
                    csv.DictWriter(handle, fieldnames=LOG_COLUMNS).writerow(record)
            if train_cfg.preview_every and done % train_cfg.preview_every == 0:
                crop = preview_item["image"][None].to(device)
                mask = random_patch_mask([int(preview_item["seed"])], model_cfg.n_patches,
                                         model_cfg.n_patches - model_cfg.n_visible, device)
                _save_preview(out / "previews" / f"step_{done:07d}.png", model, crop, mask, done, last_loss)
        if (train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0) or done == train_cfg.steps:
            checkpoint(done)
        if ctx.main and progress is not None:
            progress(done, train_cfg.steps, record)
    return {"out": str(out), "checkpoint": str(checkpoint_path), "prior": str(prior_path), "log": str(log_path),
            "start_step": start_step, "steps": train_cfg.steps, "resumed": resumed, "final_loss": last_loss,
            "processes": ctx.world, "precision": precision, "seconds": time.perf_counter() - started,
            "training_data": description}
