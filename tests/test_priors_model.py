"""priors.model, priors.gaussian_space and priors.checkpoints: architecture, heads, losses, export."""
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.operators.voxelize import quaternion_to_rotation
from priors import checkpoints
from priors.gaussian_space import block_to_world, matrix_to_quaternion, world_to_block
from priors.model import (ARCHITECTURES, CONFIGS, CropGaussians, ModelConfig, build_model, count_parameters,
                          model_config, patch_anchors, patch_mask_to_voxels, patchify, random_patch_mask, unpatchify)

SMALL_CROP = dict(crop_size=32, patch_size=8)  # 64 patches: fast on a CPU


def _block_params(E, mlp_ratio=4.0):
    H = int(E * mlp_ratio)
    return 2 * E + (3 * E * E + 3 * E) + (E * E + E) + 2 * E + (E * H + H) + (H * E + E)


def _expected_parameters(cfg: ModelConfig) -> tuple:
    """Parameter count from the architecture's description (independent of the module code)."""
    E, C, p = cfg.encoder_dim, cfg.decoder_dim, cfg.patch_size
    encoder = (p ** 3 * E + E) + E + cfg.encoder_depth * _block_params(E) + 2 * E
    common = encoder + (E * C + C) + cfg.decoder_depth * _block_params(C) + 2 * C
    if cfg.architecture == "voxel-mae":
        return encoder, common + C + (C * p ** 3 + p ** 3)
    heads = 11 * C + 11
    total = common + cfg.n_gaussians * C + heads
    if cfg.architecture == "medgmae-star":
        H = int(C * cfg.mlp_ratio)
        total += sum(m * C + 2 * C + (C * H + H) + (H * C + C) + heads for m in cfg.levels)
    return encoder, total


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameter_counts_of_every_config(name, architecture):
    cfg = model_config(name, architecture)
    with torch.device("meta"):
        model = build_model(cfg)
    encoder, total = _expected_parameters(cfg)
    assert count_parameters(model.encoder) == encoder
    assert count_parameters(model) == total
    assert cfg.crop_size == 96 and cfg.n_patches == {12: 512, 16: 216}[cfg.patch_size]


def test_paper_config_matches_the_paper():
    cfg = model_config("paper")
    assert (cfg.encoder_dim, cfg.encoder_depth, cfg.encoder_heads) == (1536, 12, 16)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (528, 8, 16)
    assert (cfg.n_gaussians, cfg.patch_size, cfg.n_patches, cfg.n_visible) == (512, 12, 512, 128)
    with torch.device("meta"):
        model = build_model(cfg)
        crops = torch.empty(2, 1, 96, 96, 96)
        mask = torch.zeros(2, 512, dtype=torch.bool)
        mask[:, :384] = True
        out = model(crops, mask)
    assert [tuple(t.shape) for t in out] == [(2, 512, 3), (2, 512, 3), (2, 512, 4), (2, 512)]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_output_shapes_and_ranges(architecture):
    cfg = model_config("tiny", architecture, **SMALL_CROP)
    torch.manual_seed(0)
    model = build_model(cfg)
    crops = torch.rand(2, 1, 32, 32, 32)
    mask = random_patch_mask([3, 4], cfg.n_patches, cfg.n_patches - cfg.n_visible)
    out = model(crops, mask)
    if architecture == "voxel-mae":
        assert out.shape == (2, 64, 8 ** 3)
        assert model.reconstruct(crops, mask).shape == crops.shape
        return
    n = sum(cfg.gaussians_per_level)
    assert [tuple(t.shape) for t in out] == [(2, n, 3), (2, n, 3), (2, n, 4), (2, n)]
    level0 = out.level(cfg.gaussians_per_level, 0)
    assert torch.all((level0.means > 0) & (level0.means < 1))
    assert torch.all((level0.scales > 0) & (level0.scales < cfg.max_scale))
    assert torch.allclose(out.quats.norm(dim=-1), torch.ones(2, n), atol=1e-5)
    assert torch.all(out.scales >= 0.5 / 32 - 1e-7)  # half a voxel: every Gaussian reaches a voxel centre


def test_encoder_sees_visible_patches_only():
    cfg = model_config("tiny", **SMALL_CROP)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    crops = torch.rand(1, 1, 32, 32, 32)
    mask = random_patch_mask([7], cfg.n_patches, cfg.n_patches - cfg.n_visible)
    changed = crops.clone()
    changed[patch_mask_to_voxels(mask, 8, 4)] = 5.0
    with torch.no_grad():
        a, b = model(crops, mask), model(changed, mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert model.encoder(crops, torch.nonzero(~mask)[:, 1][None]).shape == (1, 1 + cfg.n_visible, cfg.encoder_dim)


def test_the_mask_is_an_argument_and_none_leaves_every_patch_visible():
    cfg = model_config("tiny", "medgmae-star", **SMALL_CROP)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    crops = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        every = model(crops)
        assert all(torch.equal(a, b) for a, b in zip(every, model(crops, torch.zeros(2, 64, dtype=torch.bool))))
        tokens, visible = model.forward_encoder(crops, random_patch_mask([1, 2], 64, 10))  # not cfg's mask_ratio
    assert tokens.shape == (2, 1 + 54, cfg.encoder_dim) and visible.shape == (2, 54)
    ragged = torch.zeros(2, 64, dtype=torch.bool)
    ragged[0, :5] = True
    for bad in (ragged, torch.ones(2, 64, dtype=torch.bool), torch.zeros(2, 63, dtype=torch.bool)):
        with pytest.raises(InputError, match="mask"):
            model(crops, bad)


def test_mask_is_per_sample_and_exact():
    m = random_patch_mask([1, 2, 1], 512, 384)
    assert m.shape == (3, 512) and m.sum(1).tolist() == [384, 384, 384]
    assert torch.equal(m[0], m[2]) and not torch.equal(m[0], m[1])


def test_patchify_round_trip_and_order():
    x = torch.arange(32 ** 3, dtype=torch.float32).reshape(1, 1, 32, 32, 32)
    patches = patchify(x, 8)
    assert patches.shape == (1, 64, 512)
    assert patches[0, 1, 0] == x[0, 0, 0, 0, 8]  # second patch is the next one along x
    assert torch.equal(unpatchify(patches, 8, 4), x)


def _head_values(head_init, seeds):
    scales, intensities = [], []
    for seed in seeds:
        cfg = model_config("tiny", head_init=head_init, **SMALL_CROP)
        torch.manual_seed(seed)
        model = build_model(cfg).eval()
        crops = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = model(crops, random_patch_mask([seed, seed + 1], cfg.n_patches, 48))
        scales.append(out.scales / cfg.max_scale)
        intensities.append(out.intensities)
    return torch.cat([s.flatten() for s in scales]), torch.cat([i.flatten() for i in intensities])


def test_initial_head_values():
    # Paper init (Xavier weights): the biases put the median of the outputs at sigmoid(bias) on average
    # over initialisations; the public code's N(0, 0.01²) scale weights pin every scale near it.
    # Scales are floor + (max − floor)·sigmoid with a floor of half a voxel (1/64 of a 32³ crop).
    floor, top = 0.5 / 32, model_config("tiny").max_scale
    expected_scale = (floor + (top - floor) * torch.sigmoid(torch.tensor(-1.386)).item()) / top
    assert expected_scale == pytest.approx(0.2 + 0.8 * floor / top, abs=1e-3)
    scales, intensities = _head_values("paper", range(8))
    assert abs(scales.median().item() - expected_scale) < 0.04
    assert abs(intensities.median().item() - 0.4) < 0.06
    scales, _ = _head_values("code", [0])
    assert abs(scales.median().item() - expected_scale) < 0.01 and scales.std().item() < 0.02


def test_medgmae_star_levels_are_bounded_residuals():
    cfg = model_config("tiny", "medgmae-star", **SMALL_CROP)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 32, 32), random_patch_mask([0], cfg.n_patches, 48))
    counts = cfg.gaussians_per_level
    assert counts == [64, 128, 256]
    parent = out.level(counts, 0)
    for level, (m, offset) in enumerate(zip(cfg.levels, cfg.level_scale_offsets), start=1):
        child = out.level(counts, level)
        rep = lambda t: t.repeat_interleave(m, dim=1)  # noqa: E731
        assert torch.all((child.means - rep(parent.means)).abs() <= cfg.residual_position + 1e-6)
        assert torch.all((child.intensities - rep(parent.intensities)).abs() <= cfg.residual_intensity + 1e-6)
        ds = child.scales - rep(parent.scales)
        unclamped = child.scales > 0.5 / 32 + 1e-7
        assert torch.all(ds[unclamped] <= cfg.residual_scale - offset + 1e-6)
        assert torch.all(ds[unclamped] >= -cfg.residual_scale - offset - 1e-6)
        # |q̂·σ_rot| ≤ 2σ_rot for 4 tanh components; renormalising moves a unit quaternion by ≤ 2|δ|.
        dq = (child.quats - rep(parent.quats)).norm(dim=-1)
        assert torch.all(dq <= 4 * cfg.residual_rotation + 1e-5)


def test_config_validation():
    with pytest.raises(InputError):
        model_config("huge")
    with pytest.raises(InputError):
        model_config("tiny", crop_size=40)  # not a multiple of the patch
    with pytest.raises(InputError):
        model_config("tiny", loss="zeroed-visible", render="points")
    assert ModelConfig.from_dict(model_config("small").to_dict()) == model_config("small")
    with pytest.raises(InputError, match="multiple of the 64 patches"):
        model_config("tiny", gaussian_tokens="patches", n_gaussians=100, **SMALL_CROP)
    with pytest.raises(InputError, match="gaussian_tokens"):
        model_config("tiny", gaussian_tokens="voxels")
    for bad in ((0.5, 0.2), (0.1, 1.0), (-0.1, 0.3), (0.3,)):
        with pytest.raises(InputError, match="mask_ratio_range"):
            model_config("tiny", mask_ratio_range=bad)
    # priors written before these fields existed load with the paper's behaviour
    old = model_config("tiny").to_dict()
    del old["gaussian_tokens"], old["mask_ratio_range"]
    assert ModelConfig.from_dict(old) == model_config("tiny")


def test_variable_mask_ratio_is_drawn_per_step_from_the_seed():
    cfg = model_config("tiny", mask_ratio_range=(0.0, 0.5), **SMALL_CROP)
    counts = [cfg.masked_patches(3, step, at_least=0) for step in range(400)]
    assert counts == [cfg.masked_patches(3, step, at_least=0) for step in range(400)]   # a pure function
    assert counts != [cfg.masked_patches(4, step, at_least=0) for step in range(400)]
    assert min(counts) == 0 and max(counts) == 32 and abs(sum(counts) / len(counts) - 16) < 1.5
    assert min(cfg.masked_patches(3, step) for step in range(400)) == 1                 # the clean loss needs one
    assert model_config("tiny", mask_ratio_range=(0.995, 0.999), **SMALL_CROP).masked_patches(0, 1) == 63  # never all
    fixed = model_config("tiny", **SMALL_CROP)
    assert {fixed.masked_patches(0, step) for step in range(20)} == {fixed.n_patches - fixed.n_visible}


def test_patch_token_decoder_anchors_gaussians_in_their_patches():
    """gaussian_tokens="patches": patch p's K/n Gaussians (level 0) sit within a patch width of anchors inside
    patch p; a masked patch still decodes Gaussians (from the mask token) but its voxels are never read."""
    cfg = model_config("tiny", "medgmae-star", gaussian_tokens="patches", n_gaussians=128, **SMALL_CROP)
    anchors = patch_anchors(cfg.grid, 2)
    cells = torch.floor(anchors * cfg.grid).long()                         # (x, y, z) patch of each anchor
    raster = torch.arange(cfg.n_patches).repeat_interleave(2)
    assert torch.equal(cells[:, 2] * 16 + cells[:, 1] * 4 + cells[:, 0], raster)
    inside = (anchors * cfg.grid - cells).reshape(cfg.n_patches, 2, 3)           # the same two points in every patch
    assert torch.allclose(inside, inside[:1].expand_as(inside), atol=1e-5) and not torch.allclose(inside[0, 0], inside[0, 1])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    E, C = cfg.encoder_dim, cfg.decoder_dim
    expected = _expected_parameters(cfg)[1] - cfg.n_gaussians * C + C + 2 * C   # no queries: mask + 2 child tokens
    assert count_parameters(model) == expected
    crops = torch.rand(2, 1, 32, 32, 32)
    mask = random_patch_mask([1, 2], cfg.n_patches, 16)
    with torch.no_grad():
        gaussians = model(crops, mask)
        level0 = gaussians.level(cfg.gaussians_per_level, 0)
        assert gaussians.means.shape == (2, 128 + 256 + 512, 3)
        assert float((level0.means - anchors).abs().max()) <= 8 / 32
        hidden = patch_mask_to_voxels(mask, 8, 4)
        changed = model(torch.where(hidden, torch.rand_like(crops), crops), mask)
        assert all(torch.equal(a, b) for a, b in zip(gaussians, changed))
        assert not torch.equal(model(crops).means, gaussians.means)       # visible patches do matter


# --------------------------------------------------------------------------- losses
def _brute_force_render(g: CropGaussians, size: int) -> torch.Tensor:
    """Full (untruncated) sum of Gaussians at the crop's voxel centres, [B, 1, Z, Y, X] in float64."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    out = []
    for b in range(g.means.shape[0]):
        rot = quaternion_to_rotation(g.quats[b].double())
        cov = rot @ torch.diag_embed(g.scales[b].double() ** 2) @ rot.transpose(-1, -2)
        d = pts[:, None, :] - g.means[b].double()[None]
        q = torch.einsum("mni,nij,mnj->mn", d, torch.linalg.inv(cov), d)
        out.append((g.intensities[b].double() * torch.exp(-0.5 * q)).sum(1).reshape(size, size, size))
    return torch.stack(out)[:, None]


def _loss_case(loss="masked", render="dense"):
    cfg = model_config("tiny", loss=loss, render=render, k_sigma=40.0, **SMALL_CROP)
    torch.manual_seed(2)
    model = build_model(cfg)
    crops = torch.rand(2, 1, 32, 32, 32)
    mask = random_patch_mask([5, 6], cfg.n_patches, 48)
    with torch.no_grad():
        gaussians = model(crops, mask)
    return model, crops, mask, gaussians


def test_masked_loss_is_mse_on_masked_voxels_only():
    model, crops, mask, g = _loss_case()
    voxels = patch_mask_to_voxels(mask, 8, 4)
    rendered = _brute_force_render(g, 32)
    expected = ((rendered - crops.double())[voxels] ** 2).mean()
    loss = model.forward_loss(crops, g, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    changed = crops.clone()
    changed[~voxels] = torch.rand(int((~voxels).sum()))
    assert model.forward_loss(changed, g, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed = crops.clone()
    changed[voxels] += 0.5
    assert abs(model.forward_loss(changed, g, mask).item() - loss.item()) > 1e-3


def test_sparse_point_rendering_gives_the_same_loss():
    model, crops, mask, g = _loss_case()
    dense = model.forward_loss(crops, g, mask)
    sparse = build_model(model.cfg.replace(render="points")).forward_loss(crops, g, mask)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


def test_public_code_loss_variant():
    model, crops, mask, g = _loss_case(loss="zeroed-visible")
    voxels = patch_mask_to_voxels(mask, 8, 4)
    expected = ((_brute_force_render(g, 32) - crops.double() * voxels) ** 2).mean()
    assert model.forward_loss(crops, g, mask).item() == pytest.approx(expected.item(), rel=1e-4)


def test_voxel_mae_loss_is_mse_on_masked_patches():
    cfg = model_config("tiny", "voxel-mae", **SMALL_CROP)
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # no stochastic depth: both forward passes agree
    crops = torch.rand(2, 1, 32, 32, 32)
    mask = random_patch_mask([1, 2], cfg.n_patches, 48)
    with torch.no_grad():
        predicted = model(crops, mask)
        expected = ((predicted - patchify(crops, 8)) ** 2)[mask].mean()
        assert model.loss(crops, mask).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("architecture,tokens", [("medgmae", "queries"), ("medgmae", "patches"), ("voxel-mae", "queries")])
def test_tiny_model_overfits_one_crop(architecture, tokens):
    # The public code's head variant (N(0, 0.01²) scale weights, 0.1 intensity gain): with the paper's
    # Xavier heads the K summed Gaussians start clustered and ~100× too bright, and the first steps
    # collapse the field to zero (see ModelConfig in priors/model.py).
    cfg = model_config("tiny", architecture, drop_path=0.0, crop_size=16, patch_size=4, head_init="code",
                       intensity_gain=0.1, gaussian_tokens=tokens)
    torch.manual_seed(0)
    c = (torch.arange(16, dtype=torch.float32) + 0.5) / 16
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    crop = (0.6 * torch.exp(-((xx - 0.4) ** 2 + (yy - 0.55) ** 2 + (zz - 0.5) ** 2) / (2 * 0.15 ** 2))
            + 0.3 * torch.exp(-((xx - 0.7) ** 2 / 0.08 ** 2 + (yy - 0.3) ** 2 / 0.2 ** 2 + (zz - 0.6) ** 2 / 0.1 ** 2) / 2))
    crop = crop[None, None]
    mask = random_patch_mask([0], cfg.n_patches, 48)
    zero_prediction = (crop[patch_mask_to_voxels(mask, 4, 4)] ** 2).mean().item()
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = model.loss(crop, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = min(losses[-5:])
    # query tokens start clustered and far too bright; patch tokens start spread over the crop
    assert final < losses[0] / (10 if tokens == "queries" else 2)
    if architecture == "medgmae":
        assert final < 0.5 * zero_prediction  # structure is fitted, not just a collapsed dark field


# --------------------------------------------------------------------------- Gaussian space
def _random_gaussians(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g, dtype=torch.float64)
    scales = 0.02 + 0.1 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    return means, scales, quats, torch.rand(n, generator=g, dtype=torch.float64)


def test_quaternion_matrix_round_trip():
    _, _, quats, _ = _random_gaussians(200)
    rot = quaternion_to_rotation(quats)
    assert torch.allclose(rot @ rot.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(200, 3, 3), atol=1e-12)
    assert torch.allclose(quaternion_to_rotation(matrix_to_quaternion(rot)), rot, atol=1e-10)
    half_turns = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(quaternion_to_rotation(matrix_to_quaternion(quaternion_to_rotation(half_turns))),
                          quaternion_to_rotation(half_turns), atol=1e-12)


def test_block_to_world_preserves_field_values_for_anisotropic_blocks():
    block = VolumeGeometry((96, 96, 96), (2.5, 0.8, 1.2), (10.0, -5.0, 30.0))  # (dz, dy, dx) mm
    means, scales, quats, inten = _random_gaussians(50)
    w_means, w_scales, w_quats, w_inten = block_to_world(means, scales, quats, inten, block)
    # Crop-unit voxel centres land on the block's world voxel centres.
    corner_voxel = torch.tensor([[0.5 / 96, 0.5 / 96, 0.5 / 96]], dtype=torch.float64)
    expected = torch.as_tensor(block.voxel_centres()[0, 0, 0])
    assert torch.allclose(block_to_world(corner_voxel, scales[:1], quats[:1], inten[:1], block)[0][0], expected)
    # Field values at corresponding points agree (exact covariance transform).
    pts = torch.rand(300, 3, dtype=torch.float64)
    size = torch.tensor([96 * 1.2, 96 * 0.8, 96 * 2.5], dtype=torch.float64)
    world_pts = torch.as_tensor(block.bounds()[0]) + pts * size

    def field(p, m, s, q, i):
        rot = quaternion_to_rotation(q)
        prec = torch.linalg.inv(rot @ torch.diag_embed(s ** 2) @ rot.transpose(-1, -2))
        d = p[:, None] - m[None]
        return (i * torch.exp(-0.5 * torch.einsum("pni,nij,pnj->pn", d, prec, d))).sum(1)

    assert torch.allclose(field(pts, means, scales, quats, inten), field(world_pts, w_means, w_scales, w_quats, w_inten),
                          rtol=1e-9, atol=1e-12)
    back = world_to_block(w_means, w_scales, w_quats, w_inten, block)
    assert torch.allclose(field(pts, *back), field(pts, means, scales, quats, inten), rtol=1e-9, atol=1e-12)


def test_isotropic_block_only_scales():
    block = VolumeGeometry((96, 96, 96), (1.5, 1.5, 1.5))
    means, scales, quats, inten = _random_gaussians(10)
    w = block_to_world(means, scales, quats, inten, block)
    assert torch.allclose(w[1], scales * 144.0) and torch.allclose(w[2], quats)
    assert torch.allclose(w[0], (means - 0.5) * 144.0)


# --------------------------------------------------------------------------- checkpoints and export
def test_prior_round_trip_and_safe_loading(tmp_path):
    from priors.data import DataConfig

    cfg = model_config("tiny", "medgmae-star", **SMALL_CROP)
    model = build_model(cfg)
    meta = checkpoints.prior_metadata(cfg, DataConfig(window_hu=(-1024, 3071)), {"root": "x", "n_volumes": 1}, 7)
    checkpoints.save_prior(tmp_path / "prior.pt", model, meta)
    loaded, meta2 = checkpoints.load_prior(tmp_path / "prior.pt")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    for key in ("architecture", "config", "intensity_window_hu", "voxel_spacing_mm", "crop_size",
                "gaussians_per_block", "gaussians_per_level", "training_data", "code_version"):
        assert key in meta2
    assert meta2["gaussians_per_level"] == [64, 128, 256] and meta2["gaussians_per_block"] == 448
    assert meta2["intensity_window_hu"] == [-1024.0, 3071.0] and meta2["crop_size"] == [32, 32, 32]

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"format": "ctrecon-prior", "metadata": "{}", "state_dict": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="holds Python objects .*print.* refuses to unpickle") as refused:
        checkpoints.load_prior(tmp_path / "evil.pt")
    assert "weights_only" not in str(refused.value) and "will likely succeed" not in str(refused.value)
    with pytest.raises(InputError):
        checkpoints.load_prior(tmp_path / "missing.pt")


def test_encoder_export_loads_into_monai_vit_and_unetr(tmp_path):
    monai_nets = pytest.importorskip("monai.networks.nets", reason="MONAI not installed")
    pytest.importorskip("einops", reason="MONAI's attention needs einops")
    cfg = model_config("tiny", **SMALL_CROP)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    kwargs = checkpoints.export_encoder(model, tmp_path / "encoder.pt")
    vit = monai_nets.ViT(**kwargs, classification=True).eval()
    checkpoints.load_encoder_into_monai(vit, tmp_path / "encoder.pt")
    crops = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        ours = model.encoder(crops, torch.arange(cfg.n_patches).expand(2, -1))
        _, hidden = vit(crops.permute(0, 1, 4, 3, 2))  # MONAI's (x, y, z) arrays
        theirs = vit.norm(hidden[-1])
    g = cfg.grid
    ours_xyz = ours[:, 1:].reshape(2, g, g, g, -1).permute(0, 3, 2, 1, 4).reshape(2, cfg.n_patches, -1)
    assert torch.allclose(theirs[:, 0], ours[:, 0], atol=2e-3)
    assert torch.allclose(theirs[:, 1:], ours_xyz, atol=2e-3)
    # MONAI's UNETR hard-codes 16³ patches and 12 layers.
    cfg16 = model_config("tiny", encoder_depth=12, crop_size=32, patch_size=16)
    kwargs16 = checkpoints.export_encoder(build_model(cfg16), tmp_path / "encoder16.pt")
    unetr = monai_nets.UNETR(in_channels=1, out_channels=3, img_size=kwargs16["img_size"], feature_size=8,
                             hidden_size=kwargs16["hidden_size"], mlp_dim=kwargs16["mlp_dim"],
                             num_heads=kwargs16["num_heads"], qkv_bias=True)
    checkpoints.load_encoder_into_monai(unetr, tmp_path / "encoder16.pt")
    exported = torch.load(tmp_path / "encoder16.pt", weights_only=True)["state_dict"]
    assert torch.equal(unetr.vit.blocks[11].attn.qkv.weight, exported["blocks.11.attn.qkv.weight"])
    assert unetr(crops.permute(0, 1, 4, 3, 2)).shape == (2, 3, 32, 32, 32)
    for wrong_depth in (1, 3):  # every exported block must land, and every block must get weights
        with pytest.raises(InputError):
            checkpoints.load_encoder_into_monai(monai_nets.ViT(**{**kwargs, "num_layers": wrong_depth}),
                                                tmp_path / "encoder.pt")
