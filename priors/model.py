"""MedGMAE, MedGMAE* and the voxel-MAE baseline on single-channel 3-D crops (MedGMAE, ICLR 2026).

Crops are ``[B, 1, D, D, D]`` arrays ordered ``[Z, Y, X]`` with values in [0, 1]. They are cut into
``(D/p)³`` patches of ``p³`` voxels (raster order z, y, x); a boolean mask ``[B, n_patches]`` marks the
masked patches (True = hidden from the encoder), the same number in every row; no mask (None): every
patch visible, as zero-shot inference runs. Pre-training draws the masks (``mask_ratio`` of the
patches, :func:`random_patch_mask`) and hands them to the model, which runs the steps of MAE
(facebookresearch/mae): ``forward_encoder(crops, mask)`` → ``forward_decoder`` → ``forward_loss``;
``model(crops, mask)`` is the prediction and ``model.loss(crops, mask)`` the training loss.

* Encoder: a ViT that embeds the visible patches only (a linear map of each patch, stored as the
  ``Conv3d`` kernel it equals), adds a fixed 3-D sin-cos position embedding, prepends a cls token
  (no position embedding) and runs pre-norm transformer blocks.
* Gaussian decoder (MedGMAE): the encoder tokens are projected to the decoder width and the decoder
  reads ``[cls] + K learnable Gaussian query tokens + visible tokens``; after its blocks four linear
  heads turn each query token into one Gaussian: centre (sigmoid → [0, 1]³ of the crop, (x, y, z)),
  scales (σ in crop units, ``max_scale·sigmoid``, bias −1.386), rotation (L2-normalised quaternion
  (w, x, y, z)) and intensity (sigmoid, bias −0.405). K does not depend on the mask.
* Patch-token decoder (``gaussian_tokens="patches"``, not in the paper): the decoder reads ``[cls] +``
  every patch (visible ones by their encoder token, masked ones by a mask token, plus a sin-cos position
  embedding, as the voxel-MAE decoder); each patch token plus each of ``K / n_patches`` child tokens goes
  through the same four heads, the centre as a tanh offset of up to one patch width from a fixed Halton
  anchor inside the patch.
* MedGMAE*: levels 1, 2 hold ``m_l`` children per level-0 Gaussian, each a tanh-bounded residual of
  its level-0 parent (paper eq. 4): ``s_l = s_0 + ŝ_l·σ_s − Δs_l``, ``μ_l = μ_0 + μ̂_l·σ_μ``,
  ``I_l = I_0 + Î_l·σ_I``, ``q_l = normalize(q_0 + q̂_l·σ_rot)``; the rendered set is all levels.
* Voxel-MAE: the same encoder with a standard MAE decoder regressing the voxels of masked patches
  (the paper's "Voxel SSL" ablation).

The Gaussian field of a crop is ``Σ I·exp(−½ dᵀΣ⁻¹d)`` rendered by :mod:`ctrecon.operators.voxelize` on
the crop's voxel centres ``((i+½)/D, (j+½)/D, (k+½)/D)`` (see :func:`crop_geometry`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry

__all__ = ["ModelConfig", "CONFIGS", "ARCHITECTURES", "model_config", "build_model", "count_parameters",
           "CropGaussians", "MedGMAE", "VoxelMAE", "ViTEncoder", "crop_geometry", "random_patch_mask",
           "patchify", "unpatchify", "patch_mask_to_voxels", "sincos_position_embedding", "render_crop"]

ARCHITECTURES = ("medgmae", "medgmae-star", "voxel-mae")
#: Where MedGMAE's level-0 Gaussians come from: the paper's K learnable query tokens, or every patch token
#: of a full decoder sequence (masked patches filled by a mask token), each decoding K / n_patches Gaussians
#: anchored in its patch.
GAUSSIAN_TOKENS = ("queries", "patches")
SCALE_BIAS = -1.386       # sigmoid → 0.2 (paper §3.2 / Table 8)
INTENSITY_BIAS = -0.405   # sigmoid → 0.4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and loss of a prior; serialised into every checkpoint's metadata.

    ``mask_ratio`` is the share of patches a pre-training mask hides (the model itself takes any mask,
    or none); with ``mask_ratio_range`` ``(low, high)`` each optimizer step draws its share from U(low,
    high) instead (MDAE's variable ratio, see :meth:`masked_patches`). Lengths of Gaussians (centres,
    scales) are in crop units ([0, 1] spans the crop).
    ``levels`` are MedGMAE*'s children per level-0 Gaussian (m1, m2); ``loss`` is ``"masked"`` (paper: MSE on masked
    voxels) or ``"zeroed-visible"`` (public code: MSE of the whole rendered crop against the input
    with visible patches zeroed). ``head_init`` ``"paper"`` is Xavier-uniform for every head,
    ``"code"`` the public code's N(0, 0.01²) scale-head weights. ``intensity_gain`` multiplies the
    intensity head (the public code renders 0.1·sigmoid). ``render`` ``"dense"`` voxelizes the whole
    crop, ``"points"`` evaluates the masked voxels only (same loss, different cost). Scales never fall
    below ``min_scale_voxels`` voxels (so every Gaussian reaches a voxel centre and keeps a gradient).
    ``gaussian_tokens`` (:data:`GAUSSIAN_TOKENS`): ``"queries"`` is the paper's decoder; ``"patches"``
    (not in the paper) decodes every patch into ``n_gaussians / n_patches`` Gaussians whose centres lie
    within one patch width of fixed anchors inside the patch.

    Initialisation note: the field is a *sum* of K Gaussians. With the paper's heads (Xavier weights,
    intensity ≈ 0.4, scale ≈ 0.2·max) the query tokens start nearly alike, so the K Gaussians start
    clustered with a field 10–1000× brighter than CT; on small tests the first optimizer steps then
    collapse the field to zero, from which it recovers slowly. The public code's variant
    (``head_init="code"``, ``intensity_gain=0.1``) starts near the data's level and trains from step 1.
    """

    architecture: str = "medgmae"
    crop_size: int = 96
    patch_size: int = 12
    encoder_dim: int = 1536
    encoder_depth: int = 12
    encoder_heads: int = 16
    decoder_dim: int = 528
    decoder_depth: int = 8
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    mask_ratio: float = 0.75
    mask_ratio_range: tuple = ()
    n_gaussians: int = 512
    max_scale: float = 0.5
    min_scale_voxels: float = 0.5
    intensity_gain: float = 1.0
    head_init: str = "paper"
    levels: tuple = (3, 16)
    level_scale_offsets: tuple = (0.02, 0.05)
    residual_scale: float = 0.1
    residual_position: float = 0.05
    residual_intensity: float = 0.1
    residual_rotation: float = 0.2
    loss: str = "masked"
    render: str = "dense"
    k_sigma: float = 3.0
    gaussian_tokens: str = "queries"

    def __post_init__(self):
        object.__setattr__(self, "levels", tuple(int(m) for m in self.levels))
        object.__setattr__(self, "mask_ratio_range", tuple(float(r) for r in self.mask_ratio_range))
        object.__setattr__(self, "level_scale_offsets", tuple(float(d) for d in self.level_scale_offsets))
        checks = [
            (self.architecture in ARCHITECTURES, f"architecture must be one of {', '.join(ARCHITECTURES)}"),
            (self.crop_size > 0 and self.patch_size > 0 and self.crop_size % self.patch_size == 0,
             f"crop_size ({self.crop_size}) must be a positive multiple of patch_size ({self.patch_size})"),
            (self.encoder_dim % 6 == 0 and self.decoder_dim % 6 == 0,
             "encoder_dim and decoder_dim must be multiples of 6 (3-D sin-cos position embedding)"),
            (self.encoder_dim % self.encoder_heads == 0 and self.decoder_dim % self.decoder_heads == 0,
             "encoder/decoder width must be divisible by its number of heads"),
            (0.0 < self.mask_ratio < 1.0 and 1 <= self.n_visible < self.n_patches,
             f"mask_ratio {self.mask_ratio} must leave at least one visible and one masked patch"),
            (self.mask_ratio_range == () or (len(self.mask_ratio_range) == 2
                                             and 0.0 <= self.mask_ratio_range[0] <= self.mask_ratio_range[1] < 1.0),
             f"mask_ratio_range must be () or (low, high) with 0 <= low <= high < 1, got {self.mask_ratio_range}"),
            (self.n_gaussians >= 1, "n_gaussians must be >= 1"),
            (self.gaussian_tokens in GAUSSIAN_TOKENS, f"gaussian_tokens must be one of {', '.join(GAUSSIAN_TOKENS)}"),
            (self.gaussian_tokens == "queries" or self.n_gaussians % self.n_patches == 0,
             f"gaussian_tokens='patches' needs n_gaussians ({self.n_gaussians}) to be a multiple of the "
             f"{self.n_patches} patches"),
            (0.0 < self.min_scale_voxels / self.crop_size < self.max_scale,
             "need 0 < min_scale_voxels / crop_size < max_scale"),
            (len(self.levels) == len(self.level_scale_offsets) and all(m >= 1 for m in self.levels),
             "levels and level_scale_offsets must have one positive entry per extra level"),
            (self.loss in ("masked", "zeroed-visible"), "loss must be 'masked' or 'zeroed-visible'"),
            (self.render in ("dense", "points"), "render must be 'dense' or 'points'"),
            (self.head_init in ("paper", "code"), "head_init must be 'paper' or 'code'"),
            (self.loss == "masked" or self.render == "dense", "the 'zeroed-visible' loss needs render='dense'"),
            (self.k_sigma > 0 and self.intensity_gain > 0, "k_sigma and intensity_gain must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"model config: {message}")

    @property
    def grid(self) -> int:
        """Patches per axis."""
        return self.crop_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid ** 3

    @property
    def n_visible(self) -> int:
        """Visible patches of a pre-training mask."""
        return int(round(self.n_patches * (1.0 - self.mask_ratio)))

    def masked_patches(self, seed: int, step: int, at_least: int = 1) -> int:
        """Patches the masks of optimizer ``step`` hide: ``n_patches - n_visible``, or with ``mask_ratio_range``
        ``round(n_patches·r)``, r ~ U(low, high) from ``(seed, step)`` (every process and micro-step of a step
        agrees), at least ``at_least`` (0 when the input is corrupted and the loss covers every voxel) and at
        most ``n_patches - 1``."""
        if not self.mask_ratio_range:
            return self.n_patches - self.n_visible
        low, high = self.mask_ratio_range
        ratio = low + (high - low) * float(torch.rand((), generator=torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + int(step)) & 0x7FFF_FFFF_FFFF_FFFF)))
        return min(self.n_patches - 1, max(int(at_least), round(self.n_patches * ratio)))

    @property
    def gaussians_per_level(self) -> list:
        """Gaussians per level: ``[K]`` (MedGMAE) or ``[K, m1·K, m2·K]`` (MedGMAE*); ``[]`` for voxel-MAE."""
        if self.architecture == "voxel-mae":
            return []
        if self.architecture == "medgmae":
            return [self.n_gaussians]
        return [self.n_gaussians] + [m * self.n_gaussians for m in self.levels]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["levels"] = list(self.levels)
        out["mask_ratio_range"] = list(self.mask_ratio_range)
        out["level_scale_offsets"] = list(self.level_scale_offsets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"model config: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)


# Named sizes. `paper` is Tables 6, 7 and 9 of the paper; the smaller ones keep its proportions.
CONFIGS = {
    "paper": dict(patch_size=12, encoder_dim=1536, encoder_depth=12, encoder_heads=16,
                  decoder_dim=528, decoder_depth=8, decoder_heads=16, n_gaussians=512),
    "base": dict(patch_size=16, encoder_dim=768, encoder_depth=12, encoder_heads=12,
                 decoder_dim=384, decoder_depth=8, decoder_heads=12, n_gaussians=512),
    "small": dict(patch_size=16, encoder_dim=384, encoder_depth=6, encoder_heads=6,
                  decoder_dim=192, decoder_depth=4, decoder_heads=6, n_gaussians=256),
    "tiny": dict(patch_size=16, encoder_dim=96, encoder_depth=2, encoder_heads=4,
                 decoder_dim=48, decoder_depth=1, decoder_heads=4, n_gaussians=64, levels=(2, 4)),
}


def model_config(name: str, architecture: str = "medgmae", **overrides) -> ModelConfig:
    """The named configuration (``paper``, ``base``, ``small``, ``tiny``) with ``overrides`` applied."""
    if name not in CONFIGS:
        raise InputError(f"unknown config {name!r} (choose from {', '.join(CONFIGS)})")
    return ModelConfig(architecture=architecture, **{**CONFIGS[name], **overrides})


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- patches and masks
def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 1, D, D, D]`` → ``[B, (D/p)³, p³]`` (patches in z, y, x raster order; voxels likewise)."""
    B, C, Z, Y, X = x.shape
    g = (Z // patch, Y // patch, X // patch)
    x = x.reshape(B, C, g[0], patch, g[1], patch, g[2], patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, g[0] * g[1] * g[2], C * patch ** 3)


def unpatchify(patches: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for cubic single-channel crops."""
    B = patches.shape[0]
    x = patches.reshape(B, grid, grid, grid, 1, patch, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(B, 1, grid * patch, grid * patch, grid * patch)


def patch_mask_to_voxels(mask: torch.Tensor, patch: int, grid: int) -> torch.Tensor:
    """``[B, n_patches]`` bool → ``[B, 1, D, D, D]`` bool (each patch's voxels)."""
    m = mask.reshape(-1, 1, grid, grid, grid)
    return m.repeat_interleave(patch, 2).repeat_interleave(patch, 3).repeat_interleave(patch, 4)


def random_patch_mask(seeds, n_patches: int, n_masked: int, device=None) -> torch.Tensor:
    """One random mask per seed: ``[len(seeds), n_patches]`` bool with exactly ``n_masked`` True.

    Seeded per sample so that a sample gets the same mask whatever the batch, process or worker.
    """
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
        order = torch.randperm(n_patches, generator=gen)
        row = torch.zeros(n_patches, dtype=torch.bool)
        row[order[:n_masked]] = True
        rows.append(row)
    return torch.stack(rows).to(device)


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 3-D sin-cos embedding ``[grid³, dim]``: sin/cos of the z, y, x patch index, dim/6 frequencies each."""
    per_axis = dim // 6
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float64) / per_axis)
    idx = torch.arange(grid, dtype=torch.float64)
    zz, yy, xx = torch.meshgrid(idx, idx, idx, indexing="ij")
    parts = []
    for coord in (zz, yy, xx):
        angle = coord.reshape(-1, 1) * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


# --------------------------------------------------------------------------- transformer
class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p`` in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.p) / (1.0 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm / MAE layout; maps one-to-one onto MONAI's TransformerBlock)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _blocks(dim, depth, heads, mlp_ratio, drop_path) -> nn.ModuleList:
    rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path] * depth
    return nn.ModuleList(Block(dim, heads, mlp_ratio, r) for r in rates)


def _init_transformer(module: nn.Module):
    """Xavier-uniform linear weights, zero biases, unit LayerNorms (MAE)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViTEncoder(nn.Module):
    """3-D ViT over the visible patches: ``(crop [B,1,D,D,D], visible [B,n]) → [B, 1+n, E]`` (cls first)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size, self.grid, self.dim = cfg.patch_size, cfg.grid, cfg.encoder_dim
        self.patch_embed = nn.Conv3d(1, cfg.encoder_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(cfg.grid, cfg.encoder_dim), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.encoder_dim))
        self.blocks = _blocks(cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads, cfg.mlp_ratio, cfg.drop_path)
        self.norm = nn.LayerNorm(cfg.encoder_dim, eps=1e-6)
        _init_transformer(self)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(cfg.encoder_dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Linear patch embedding ``[B, n, p³]`` → ``[B, n, E]`` (the Conv3d kernel applied per patch)."""
        return F.linear(patches, self.patch_embed.weight.reshape(self.dim, -1), self.patch_embed.bias)

    def forward(self, crops: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        patches = patchify(crops, self.patch_size)
        index = visible[:, :, None]
        tokens = self.embed(patches.gather(1, index.expand(-1, -1, patches.shape[-1])))
        tokens = tokens + self.pos_embed.to(tokens.dtype)[visible]
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------- Gaussians
class CropGaussians(NamedTuple):
    """Gaussians of a batch of crops in crop units: means ``[B, N, 3]`` (x, y, z) in [0, 1]³, scales
    ``[B, N, 3]`` (σ), quats ``[B, N, 4]`` (w, x, y, z) unit, intensities ``[B, N]``."""

    means: torch.Tensor
    scales: torch.Tensor
    quats: torch.Tensor
    intensities: torch.Tensor

    def float(self) -> "CropGaussians":
        return CropGaussians(*(t.float() for t in self))

    def level(self, counts, index: int) -> "CropGaussians":
        """The Gaussians of one level given the per-level ``counts``."""
        start = sum(counts[:index])
        return CropGaussians(*(t[:, start:start + counts[index]] for t in self))


def crop_geometry(crop_size: int) -> VolumeGeometry:
    """The crop as a grid of the unit cube: voxel (k, j, i) centre ``((i+½)/D, (j+½)/D, (k+½)/D)``."""
    return VolumeGeometry((crop_size,) * 3, (1.0 / crop_size,) * 3, (0.5, 0.5, 0.5))


def render_crop(gaussians: CropGaussians, crop_size: int, k_sigma: float = 3.0) -> torch.Tensor:
    """Dense rendering ``[B, 1, D, D, D]`` (float32) of crop-unit Gaussians."""
    from ctrecon.operators.voxelize import voxelize

    g = gaussians.float()
    return voxelize(g.means, g.scales, g.quats, g.intensities, crop_geometry(crop_size), k_sigma).unsqueeze(1)


def render_crop_points(gaussians: CropGaussians, points: torch.Tensor, k_sigma: float = 3.0) -> torch.Tensor:
    """Field values ``[B, M]`` at crop-unit points ``[B, M, 3]`` (x, y, z)."""
    from ctrecon.operators.voxelize import render_points

    g = gaussians.float()
    return render_points(g.means, g.scales, g.quats, g.intensities, points.float(), k_sigma)


def _voxel_centres(crop_size: int, device) -> torch.Tensor:
    """``[D, D, D, 3]`` crop-unit (x, y, z) centres of the voxels of a ``[Z, Y, X]`` crop."""
    c = (torch.arange(crop_size, device=device, dtype=torch.float32) + 0.5) / crop_size
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([xx, yy, zz], dim=-1)


class _Heads(nn.Module):
    """Four linear heads: centre (3), scale (3), rotation (4), intensity (1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.position = nn.Linear(dim, 3)
        self.scale = nn.Linear(dim, 3)
        self.rotation = nn.Linear(dim, 4)
        self.intensity = nn.Linear(dim, 1)

    def forward(self, x):
        return self.position(x), self.scale(x), self.rotation(x), self.intensity(x).squeeze(-1)


class _LevelHead(nn.Module):
    """One MedGMAE* level: ``m`` children per level-0 token, a residual MLP block, tanh residual heads."""

    def __init__(self, dim: int, children: int, mlp_ratio: float):
        super().__init__()
        self.child_tokens = nn.Parameter(torch.zeros(children, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.heads = _Heads(dim)

    def forward(self, parents: torch.Tensor):
        """``[B, K, C]`` level-0 token features → residuals (tanh) of shape ``[B, K·m, …]``."""
        B, K, C = parents.shape
        h = parents[:, :, None, :] + self.child_tokens.to(parents.dtype)
        h = h + self.mlp(self.norm(h))
        return tuple(torch.tanh(t).reshape(B, K * self.child_tokens.shape[0], *t.shape[3:])
                     for t in self.heads(h))


def _patch_sequence(latent: torch.Tensor, visible: torch.Tensor, n_patches: int, mask_token: torch.Tensor,
                    pos_embed: torch.Tensor) -> torch.Tensor:
    """``[B, 1 + n_patches, C]``: the cls token of ``latent`` ``[B, 1 + n, C]`` followed by every patch in
    raster order, a ``visible`` patch ``[B, n]`` by its token and the others by ``mask_token``, plus ``pos_embed``."""
    B = latent.shape[0]
    tokens = mask_token.to(latent.dtype).expand(B, n_patches, -1)
    tokens = tokens.scatter(1, visible[:, :, None].expand(-1, -1, latent.shape[-1]), latent[:, 1:])
    return torch.cat([latent[:, :1], tokens + pos_embed.to(latent.dtype)], dim=1)


def _halton(count: int, base: int) -> torch.Tensor:
    """The first ``count`` points (from index 1) of the van der Corput sequence in ``base``, in (0, 1)."""
    out = []
    for index in range(1, count + 1):
        value, fraction = 0.0, 1.0 / base
        while index:
            index, digit = divmod(index, base)
            value += digit * fraction
            fraction /= base
        out.append(value)
    return torch.tensor(out)


def patch_anchors(grid: int, per_patch: int) -> torch.Tensor:
    """``[grid³·per_patch, 3]`` crop-unit (x, y, z) anchors: in each patch (raster order z, y, x)
    ``per_patch`` points of the 3-D Halton sequence (bases 2, 3, 5), spread over the patch."""
    inside = torch.stack([_halton(per_patch, b) for b in (2, 3, 5)], dim=-1)        # [m, 3] in (0, 1)
    idx = torch.arange(grid, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(idx, idx, idx, indexing="ij")
    corners = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 1, 3)                     # [n, 1, 3]
    return ((corners + inside[None]) / grid).reshape(-1, 3)


class _MaskedAutoencoder(nn.Module):
    """What MedGMAE and the voxel MAE share: the encoder of the visible patches, its projection to the
    decoder width, and ``loss(crops, mask) = forward_loss(crops, model(crops, mask), mask)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg)
        self.encoder_to_decoder = nn.Linear(cfg.encoder_dim, cfg.decoder_dim)

    def _visible_indices(self, crops: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, n]`` indices of the visible patches of each row (ascending): every patch when ``mask``
        is None, else the False entries of ``mask``, which must be as many in every row (at least one).
        A mask on the meta device (shapes, no values) counts as a pre-training mask."""
        B, n_patches = crops.shape[0], self.cfg.n_patches
        if mask is None:
            return torch.arange(n_patches, device=crops.device).expand(B, n_patches)
        if tuple(mask.shape) != (B, n_patches):
            raise InputError(f"mask must be [{B}, {n_patches}] (crops, patches), got {list(mask.shape)}")
        if mask.device.type == "meta":
            n_visible = self.cfg.n_visible
        else:
            counts = (~mask).sum(1)
            n_visible = int(counts[0])
            if n_visible < 1 or not torch.all(counts == n_visible):
                raise InputError("every mask row must leave the same number of patches visible, at least one")
        return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :n_visible]

    def forward_encoder(self, crops: torch.Tensor, mask: torch.Tensor | None = None):
        """``(tokens [B, 1 + n, E] (cls first), visible [B, n])`` of the patches ``mask`` leaves visible
        (None: every patch)."""
        visible = self._visible_indices(crops, mask)
        return self.encoder(crops, visible), visible

    def loss(self, crops: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss: the encoder sees ``inputs`` (a corrupted crop; default ``crops`` itself) under
        ``mask``, the output is compared with the clean ``crops``: on the masked voxels, or with a corrupted
        input on every voxel (the visible part is then no copy of the target)."""
        if inputs is None:
            return self.forward_loss(crops, self(crops, mask), mask)
        return self.forward_loss(crops, self(inputs, mask), torch.ones_like(mask))


class MedGMAE(_MaskedAutoencoder):
    """MedGMAE (``architecture="medgmae"``) and MedGMAE* (``"medgmae-star"``).

    ``forward(crops, mask=None) → CropGaussians`` (all levels concatenated, level 0 first);
    ``forward_loss`` is the reconstruction loss of :class:`ModelConfig`.
    """

    def __init__(self, cfg: ModelConfig):
        if cfg.architecture not in ("medgmae", "medgmae-star"):
            raise InputError(f"MedGMAE cannot build architecture {cfg.architecture!r}")
        super().__init__(cfg)
        if cfg.gaussian_tokens == "queries":
            self.query_tokens = nn.Parameter(torch.zeros(1, cfg.n_gaussians, cfg.decoder_dim))
        else:
            per_patch = cfg.n_gaussians // cfg.n_patches
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
            self.child_tokens = nn.Parameter(torch.zeros(per_patch, cfg.decoder_dim))
            self.register_buffer("decoder_pos_embed", sincos_position_embedding(cfg.grid, cfg.decoder_dim),
                                 persistent=False)
            self.register_buffer("anchors", patch_anchors(cfg.grid, per_patch), persistent=False)
        self.decoder_blocks = _blocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio,
                                      cfg.drop_path)
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.heads = _Heads(cfg.decoder_dim)
        self.levels = nn.ModuleList(_LevelHead(cfg.decoder_dim, m, cfg.mlp_ratio)
                                    for m in (cfg.levels if cfg.architecture == "medgmae-star" else ()))
        _init_transformer(self.encoder_to_decoder)
        _init_transformer(self.decoder_blocks)
        _init_transformer(self.decoder_norm)
        _init_transformer(self.heads)
        _init_transformer(self.levels)
        for tokens in ((self.query_tokens,) if cfg.gaussian_tokens == "queries" else (self.mask_token, self.child_tokens)):
            nn.init.normal_(tokens, std=0.02)
        for level in self.levels:
            nn.init.normal_(level.child_tokens, std=0.02)
        if cfg.head_init == "code":
            nn.init.normal_(self.heads.scale.weight, std=0.01)
        nn.init.constant_(self.heads.scale.bias, SCALE_BIAS)
        nn.init.constant_(self.heads.intensity.bias, INTENSITY_BIAS)

    def forward(self, crops: torch.Tensor, mask: torch.Tensor | None = None) -> CropGaussians:
        return self.forward_decoder(*self.forward_encoder(crops, mask))

    def forward_decoder(self, latent: torch.Tensor, visible: torch.Tensor | None = None) -> CropGaussians:
        """The Gaussians decoded from encoder tokens ``[B, 1 + n, E]`` of the ``visible`` patches ``[B, n]``
        (None: every patch). Query tokens: the decoder reads ``[cls] + K query tokens + visible tokens`` and
        the heads turn each query token into a Gaussian. Patch tokens: it reads ``[cls] +`` every patch (see
        :func:`_patch_sequence`), and each patch token plus each of ``K / n_patches`` child tokens is one."""
        cfg = self.cfg
        latent = self.encoder_to_decoder(latent)
        if cfg.gaussian_tokens == "queries":
            queries = self.query_tokens.expand(latent.shape[0], -1, -1).to(latent.dtype)
            x = torch.cat([latent[:, :1], queries, latent[:, 1:]], dim=1)
        else:
            if visible is None:
                visible = torch.arange(cfg.n_patches, device=latent.device).expand(latent.shape[0], -1)
            x = _patch_sequence(latent, visible, cfg.n_patches, self.mask_token, self.decoder_pos_embed)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        if cfg.gaussian_tokens == "queries":
            return self._gaussians(x[:, 1:1 + cfg.n_gaussians])
        tokens = (x[:, 1:, None, :] + self.child_tokens.to(x.dtype)).reshape(x.shape[0], cfg.n_gaussians, x.shape[-1])
        return self._gaussians(tokens, self.anchors)

    def _gaussians(self, tokens: torch.Tensor, anchors: torch.Tensor | None = None) -> CropGaussians:
        """Level 0 from the tokens ``[B, K, C]``, then MedGMAE*'s residual levels. Centres: anywhere in the
        crop (sigmoid), or with ``anchors`` ``[K, 3]`` within one patch width of them (tanh)."""
        cfg = self.cfg
        pos, scale, rot, inten = self.heads(tokens)
        if anchors is None:
            means = torch.sigmoid(pos)
        else:
            means = anchors.to(pos.dtype) + torch.tanh(pos) * (cfg.patch_size / cfg.crop_size)
        floor = cfg.min_scale_voxels / cfg.crop_size
        scales = floor + (cfg.max_scale - floor) * torch.sigmoid(scale)
        quats = F.normalize(rot, dim=-1)
        intensities = cfg.intensity_gain * torch.sigmoid(inten)
        out = [(means, scales, quats, intensities)]
        for level, offset in zip(self.levels, cfg.level_scale_offsets):
            m = level.child_tokens.shape[0]
            d_pos, d_scale, d_rot, d_int = level(tokens)
            rep = lambda t: t.repeat_interleave(m, dim=1)  # noqa: E731 - parent of each child
            out.append((rep(means) + d_pos * cfg.residual_position,
                        (rep(scales) + d_scale * cfg.residual_scale - offset).clamp_min(floor),
                        F.normalize(rep(quats) + d_rot * cfg.residual_rotation, dim=-1),
                        rep(intensities) + d_int * cfg.residual_intensity))
        return CropGaussians(*(torch.cat(parts, dim=1) for parts in zip(*out)))

    def forward_loss(self, crops: torch.Tensor, gaussians: CropGaussians, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruction loss of rendered ``gaussians`` against ``crops`` (float32 rendering)."""
        with torch.autocast(crops.device.type, enabled=False):  # rendering stays float32 under AMP
            return self._rendering_loss(gaussians.float(), crops.float(), mask)

    def _rendering_loss(self, gaussians: CropGaussians, crops: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.render == "points":
            centres = _voxel_centres(cfg.crop_size, crops.device)
            voxel_mask = patch_mask_to_voxels(mask, cfg.patch_size, cfg.grid)[:, 0]
            B = crops.shape[0]
            points = centres[None].expand(B, -1, -1, -1, -1)[voxel_mask].reshape(B, -1, 3)
            values = render_crop_points(gaussians, points, cfg.k_sigma)
            return F.mse_loss(values, crops[:, 0][voxel_mask].reshape(B, -1))
        rendered = render_crop(gaussians, cfg.crop_size, cfg.k_sigma)
        voxel_mask = patch_mask_to_voxels(mask, cfg.patch_size, cfg.grid)
        if cfg.loss == "zeroed-visible":
            return F.mse_loss(rendered, crops * voxel_mask)
        return F.mse_loss(rendered[voxel_mask], crops[voxel_mask])

    @torch.no_grad()
    def reconstruct(self, crops: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The rendered crop ``[B, 1, D, D, D]`` (for previews)."""
        return render_crop(self(crops, mask), self.cfg.crop_size, self.cfg.k_sigma)


class VoxelMAE(_MaskedAutoencoder):
    """MAE with a voxel decoder: mask tokens + sin-cos positions, blocks, a linear head to ``p³`` voxels."""

    def __init__(self, cfg: ModelConfig):
        if cfg.architecture != "voxel-mae":
            raise InputError(f"VoxelMAE cannot build architecture {cfg.architecture!r}")
        super().__init__(cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_position_embedding(cfg.grid, cfg.decoder_dim),
                             persistent=False)
        self.decoder_blocks = _blocks(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio,
                                      cfg.drop_path)
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.head = nn.Linear(cfg.decoder_dim, cfg.patch_size ** 3)
        for part in (self.encoder_to_decoder, self.decoder_blocks, self.decoder_norm, self.head):
            _init_transformer(part)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, crops: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted voxels of every patch ``[B, n_patches, p³]`` (only the masked ones are trained)."""
        return self.forward_decoder(*self.forward_encoder(crops, mask))

    def forward_decoder(self, latent: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Voxels of every patch from the encoder tokens ``[B, 1 + n, E]`` of the ``visible`` patches:
        mask tokens fill the others' places."""
        latent = self.encoder_to_decoder(latent)
        x = _patch_sequence(latent, visible, self.cfg.n_patches, self.mask_token, self.decoder_pos_embed)
        for block in self.decoder_blocks:
            x = block(x)
        return self.head(self.decoder_norm(x)[:, 1:])

    def forward_loss(self, crops: torch.Tensor, predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE of the predicted voxels of the masked patches."""
        predicted = predicted.float()
        return F.mse_loss(predicted[mask], patchify(crops.float(), self.cfg.patch_size)[mask])

    @torch.no_grad()
    def reconstruct(self, crops: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visible patches from the input, masked ones predicted: ``[B, 1, D, D, D]``."""
        predicted = self(crops, mask).float()
        patches = torch.where(mask[..., None], predicted, patchify(crops.float(), self.cfg.patch_size))
        return unpatchify(patches, self.cfg.patch_size, self.cfg.grid)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg.architecture``."""
    return VoxelMAE(cfg) if cfg.architecture == "voxel-mae" else MedGMAE(cfg)

