"""Prior checkpoints: safe save/load with metadata (DESIGN.md §2), and the encoder export for MONAI.

Every file is a ``torch.save`` of a plain dict holding tensors, numbers, strings and lists only, read
back with ``torch.load(weights_only=True)`` (no arbitrary unpickling); metadata travel as a JSON
string under ``"metadata"``. Files are written atomically. Kinds (``"format"``):

* ``ctrecon-prior``: the model weights (float32) + metadata: architecture and its config, intensity
  window, voxel spacing, crop size, Gaussians per block and per level, training data, code version.
* ``ctrecon-pretrain-state``: everything needed to resume training (model, optimizer, scheduler,
  scaler, step, RNG states, data order) + the same metadata.
* ``ctrecon-monai-vit``: the encoder under MONAI ``ViT`` key names (``vit.``-prefixed for ``UNETR``
  by :func:`load_encoder_into_monai`), with the constructor arguments in the metadata.
"""
from __future__ import annotations

import datetime
import json
import math
import pickle
import re
import subprocess
from pathlib import Path

import torch

from ctrecon.core.errors import InputError

from priors.model import ModelConfig, build_model

__all__ = ["PRIOR_FORMAT", "STATE_FORMAT", "MONAI_FORMAT", "prior_metadata", "save_prior", "load_prior",
           "read_metadata", "save_state", "load_state", "monai_vit_state_dict", "export_encoder",
           "load_encoder_into_monai", "code_version"]

PRIOR_FORMAT = "ctrecon-prior"
STATE_FORMAT = "ctrecon-pretrain-state"
MONAI_FORMAT = "ctrecon-monai-vit"
FORMAT_VERSION = 1


def code_version() -> dict:
    """ctrecon's version and, when run from a git checkout, the commit."""
    import ctrecon

    commit = None
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(ctrecon.__file__).parent,
                                capture_output=True, text=True, timeout=5)
        if result.returncode == 0 and result.stdout.strip():
            commit = result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"ctrecon": ctrecon.__version__, "git_commit": commit}


def prior_metadata(model_cfg: ModelConfig, data_cfg, training_data: dict, step: int, train_cfg: dict = None) -> dict:
    """The metadata every prior carries (DESIGN.md §2)."""
    lo, hi = data_cfg.window_hu
    return {
        "format_version": FORMAT_VERSION,
        "architecture": model_cfg.architecture,
        "config": model_cfg.to_dict(),
        "intensity_window_hu": [lo, hi],
        "intensity_mapping": f"value = (clip(HU, {lo:g}, {hi:g}) - ({lo:g})) / {hi - lo:g}",
        "voxel_spacing_mm": [data_cfg.spacing_mm] * 3,
        "crop_size": [model_cfg.crop_size] * 3,
        "gaussians_per_block": sum(model_cfg.gaussians_per_level),
        "gaussians_per_level": model_cfg.gaussians_per_level,
        "gaussian_units": "centres (x, y, z) and scales (sigma) in crop units ([0, 1] spans the crop, see "
                          "priors.gaussian_space); quaternions (w, x, y, z); intensities in window units",
        "k_sigma": model_cfg.k_sigma,
        # what the encoder saw in training (priors.data): "none", "noise" (σ up to noise_sigma_max) or "fdk"
        "input_corruption": {"kind": data_cfg.corruption, **(
            {"noise_sigma_max": data_cfg.noise_sigma_max} if data_cfg.corruption == "noise" else
            {"fdk_views": list(data_cfg.fdk_views), "fdk_variants": data_cfg.fdk_variants,
             "fdk_dose": list(data_cfg.fdk_dose) or "noiseless"}
            if data_cfg.corruption == "fdk" else {})},
        "training_data": {**training_data, "preprocessing": data_cfg.to_dict()},
        # "steps": the steps this model has had (a run stopped early says so); the settings' total is kept beside
        "training": {**(train_cfg or {}), "steps": int(step), "configured_steps": (train_cfg or {}).get("steps")},
        "code_version": code_version(),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write(path, payload: dict):
    from ctrecon.core.io import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def _load_payload(path, map_location="cpu") -> dict:
    """The dict of a ctrecon checkpoint file, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # objects a safe load refuses; PyTorch's text suggests the unsafe load
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        raise InputError(f"{path} is not a ctrecon checkpoint: it holds Python objects"
                         f"{f' ({found.group(1)})' if found else ''} that ctrecon refuses to unpickle (they could "
                         "run code); a ctrecon checkpoint holds only tensors and plain data") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise InputError(f"{path} is not a readable ctrecon checkpoint ({type(err).__name__}: {first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (PRIOR_FORMAT, STATE_FORMAT, MONAI_FORMAT):
        raise InputError(f"{path} is not a ctrecon checkpoint")
    try:
        payload["metadata"] = json.loads(payload["metadata"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path} is not a ctrecon checkpoint: its metadata is missing or not JSON") from None
    if not isinstance(payload["metadata"], dict):
        raise InputError(f"{path} is not a ctrecon checkpoint: its metadata is not a JSON object")
    return payload


def _read(path, expected_format: str, map_location="cpu") -> dict:
    payload = _load_payload(path, map_location)
    if payload["format"] != expected_format:
        raise InputError(f"{path} is a {payload['format']} file, not a {expected_format} file")
    return payload


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
            for k, v in module.state_dict().items()}


def save_prior(path, model: torch.nn.Module, metadata: dict):
    """Write the model weights (float32, CPU) and ``metadata`` atomically."""
    _write(path, {"format": PRIOR_FORMAT, "metadata": json.dumps(metadata), "state_dict": _cpu_state(model)})


def read_metadata(path) -> dict:
    """Metadata of any ctrecon checkpoint (prior, training state or MONAI export)."""
    return _load_payload(path)["metadata"]


def load_prior(path, map_location="cpu"):
    """``(model in eval mode, metadata)`` from a prior (or a training-state) file."""
    payload = _load_payload(path, map_location)
    if payload["format"] == MONAI_FORMAT:
        raise InputError(f"{path} is an encoder export, not a prior")
    state = payload.get("state_dict" if payload["format"] == PRIOR_FORMAT else "model")
    meta = payload["metadata"]
    _check_prior_metadata(meta, path)
    try:
        model = build_model(ModelConfig.from_dict(meta["config"]))
    except (TypeError, ValueError) as err:  # InputError included
        raise InputError(f"{path}: its model config cannot be built ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no weights (a dict of tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"{path}: its weights do not belong to the model its metadata describes ({len(missing)} "
                         f"missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InputError(f"{path}: weight {name} has shape {tuple(tensor.shape)}, the model's is "
                             f"{tuple(expected[name].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: weight {name} has non-finite values (NaN or Inf); the prior is damaged")
    model.load_state_dict(state)
    return model.to(map_location).eval(), meta


def _positive_numbers(value, count: int, integer: bool = False) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    and (not integer or float(v).is_integer()) for v in value))


def _check_prior_metadata(meta: dict, path) -> None:
    """InputError naming the first metadata field of a prior that its users could not work with."""
    window = meta.get("intensity_window_hu")
    checks = [
        ("config", isinstance(meta.get("config"), dict), "an object"),
        ("architecture", isinstance(meta.get("architecture"), str), "a string"),
        ("intensity_window_hu", isinstance(window, list) and len(window) == 2
         and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in window)
         and window[0] < window[1], "[low, high] HU with low < high"),
        ("voxel_spacing_mm", _positive_numbers(meta.get("voxel_spacing_mm"), 3), "3 positive numbers"),
        ("crop_size", _positive_numbers(meta.get("crop_size"), 3, integer=True), "3 positive integers"),
        ("gaussians_per_level", isinstance(meta.get("gaussians_per_level"), list)
         and _positive_numbers(meta["gaussians_per_level"], len(meta["gaussians_per_level"]), integer=True)
         and len(meta["gaussians_per_level"]) > 0, "a list of positive integers"),
    ]
    for name, good, expected in checks:
        if not good:
            raise InputError(f"{path}: metadata field {name} must be {expected}, got {meta.get(name)!r}")


def save_state(path, state: dict, metadata: dict):
    """Write a training state (a dict of tensors, numbers, strings, lists) and ``metadata`` atomically."""
    _write(path, {"format": STATE_FORMAT, "metadata": json.dumps(metadata), **state})


def load_state(path, map_location="cpu") -> dict:
    """A training state written by :func:`save_state` (``"metadata"`` parsed)."""
    return _read(path, STATE_FORMAT, map_location)


# --------------------------------------------------------------------------- MONAI export
def monai_vit_state_dict(model: torch.nn.Module, axes: str = "xyz") -> tuple:
    """``(state_dict, constructor kwargs)`` of ``model.encoder`` as a MONAI ``ViT``.

    ``axes="xyz"``: the MONAI network takes arrays ordered (x, y, z), as MONAI's NIfTI loaders produce;
    the patch kernel and the position-embedding grid are transposed so that ``ViT(crop.permute(…,
    X, Y, Z))`` computes the same token features as this encoder on the ``[Z, Y, X]`` crop (in MONAI's
    token order). ``axes="zyx"`` keeps this package's order. MONAI's LayerNorms use eps 1e-5 where the
    encoder uses 1e-6 (a relative difference of ~1e-5 in the features).
    """
    if axes not in ("xyz", "zyx"):
        raise InputError(f"axes must be 'xyz' or 'zyx', got {axes!r}")
    encoder, cfg = model.encoder, model.cfg
    kernel = encoder.patch_embed.weight.detach()
    pos = encoder.pos_embed.detach().reshape(cfg.grid, cfg.grid, cfg.grid, -1)
    if axes == "xyz":
        kernel = kernel.permute(0, 1, 4, 3, 2)
        pos = pos.permute(2, 1, 0, 3)
    out = {
        "patch_embedding.patch_embeddings.weight": kernel,
        "patch_embedding.patch_embeddings.bias": encoder.patch_embed.bias.detach(),
        "patch_embedding.position_embeddings": pos.reshape(1, cfg.n_patches, -1),
        "cls_token": encoder.cls_token.detach(),
        "norm.weight": encoder.norm.weight.detach(),
        "norm.bias": encoder.norm.bias.detach(),
    }
    names = {"norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj",
             "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
    for i, block in enumerate(encoder.blocks):
        params = dict(block.named_parameters())
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{theirs}.{kind}"] = params[f"{ours}.{kind}"].detach()
    kwargs = {"in_channels": 1, "img_size": [cfg.crop_size] * 3, "patch_size": [cfg.patch_size] * 3,
              "hidden_size": cfg.encoder_dim, "mlp_dim": int(cfg.encoder_dim * cfg.mlp_ratio),
              "num_layers": cfg.encoder_depth, "num_heads": cfg.encoder_heads, "qkv_bias": True,
              "proj_type": "conv", "pos_embed_type": "learnable"}
    return {k: v.to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}, kwargs


def export_encoder(model: torch.nn.Module, path, metadata: dict = None, axes: str = "xyz") -> dict:
    """Write the encoder as MONAI ``ViT`` weights; returns the ViT constructor kwargs.

    ``UNETR(in_channels=1, out_channels=…, img_size, hidden_size, mlp_dim, num_heads, qkv_bias=True)``
    takes them through :func:`load_encoder_into_monai` (its ViT has ``num_layers=12``).
    """
    state, kwargs = monai_vit_state_dict(model, axes)
    meta = {"monai_vit_kwargs": kwargs, "axes": axes, "source": metadata or {}}
    _write(path, {"format": MONAI_FORMAT, "metadata": json.dumps(meta), "state_dict": state})
    return kwargs


def load_encoder_into_monai(network: torch.nn.Module, path) -> torch.nn.Module:
    """Load an exported encoder into a MONAI ``ViT`` or ``UNETR`` (its ``vit``); returns ``network``.

    Every exported tensor must find its place (``cls_token`` only where the ViT has one); parameters
    the export does not provide are left as they are (UNETR's decoder, a classification head, unused
    cross-attention norms).
    """
    payload = _read(path, MONAI_FORMAT)
    vit = network.vit if hasattr(network, "vit") else network
    state = dict(payload["state_dict"])
    if not hasattr(vit, "cls_token"):
        state.pop("cls_token")
    own = vit.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    wrong += [k for k in own if k.startswith("blocks.") and "cross_attn" not in k and k not in state]
    if wrong:
        raise InputError(f"{path} does not fit this MONAI network (e.g. {wrong[0]}); build it with "
                         f"{payload['metadata']['monai_vit_kwargs']}")
    vit.load_state_dict(state, strict=False)
    return network
