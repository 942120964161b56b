"""Pre-training step time, samples/s and the share of the step spent rendering Gaussians.

    python scripts/bench_pretrain.py --config small --batch 2 --steps 3            # CPU
    python scripts/bench_pretrain.py --config paper --batch 8 --device cuda        # GPU, bf16 autocast

A step is what ``ctrecon pretrain`` does per optimizer step: forward, loss (rendering included),
backward, gradient clipping, AdamW. The rendering share is the time of rendering the step's
predicted Gaussians (forward + backward, float32, dense 96³ crops) over the step time. Crops are
random: step cost depends on the Gaussians' extents (the model's outputs), not on the data.
Prints one JSON object per configuration.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ctrecon.operators._backend import resolve_device
from priors.model import CropGaussians, build_model, count_parameters, model_config, random_patch_mask
from priors.pretrain import _autocast, parameter_groups


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, architecture: str, batch: int, steps: int, warmup: int, device, precision: str) -> dict:
    cfg = model_config(name, architecture)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    autocast, precision = _autocast(device, precision)
    crops = torch.rand(batch, 1, cfg.crop_size, cfg.crop_size, cfg.crop_size, device=device)
    mask = random_patch_mask(range(batch), cfg.n_patches, cfg.n_patches - cfg.n_visible, device)
    step_times, render_times = [], []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = model.loss(crops, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step = time.perf_counter() - start
        if architecture != "voxel-mae":
            with torch.no_grad(), autocast:
                gaussians = model(crops, mask)
            leaves = CropGaussians(*(t.detach().float().requires_grad_() for t in gaussians))
            _sync(device)
            start = time.perf_counter()
            model.forward_loss(crops, leaves, mask).backward()
            _sync(device)
            render = time.perf_counter() - start
        else:
            render = 0.0
        if i >= warmup:
            step_times.append(step)
            render_times.append(render)
    step_s = sum(step_times) / len(step_times)
    render_s = sum(render_times) / len(render_times)
    return {"config": name, "architecture": architecture, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "precision": precision, "batch": batch,
            "parameters_m": round(count_parameters(model) / 1e6, 2), "gaussians": sum(cfg.gaussians_per_level),
            "step_s": round(step_s, 4), "samples_per_s": round(batch / step_s, 3),
            "render_s": round(render_s, 4), "render_share": round(render_s / step_s, 3), "timed_steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["small"], choices=["paper", "base", "small", "tiny"])
    parser.add_argument("--model", default="medgmae", choices=["medgmae", "medgmae-star", "voxel-mae"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    for name in args.config:
        print(json.dumps(bench(name, args.model, args.batch, args.steps, args.warmup, device, args.precision)),
              flush=True)


if __name__ == "__main__":
    main()
