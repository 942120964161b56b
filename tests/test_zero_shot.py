"""Zero-shot prior initialisation (priors.zero_shot): windows, world conversion, blending, pruning,
the ctrecon initialisers and `ctrecon infer`.

Most tests use a stand-in prior with a known answer (one Gaussian per crop voxel centre, intensity =
the voxel's value) so that the stitched world field can be checked against a brute-force sum built
from the voxel grid alone; the seam test uses the shipped prior on the shipped real CT.
"""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.methods.gaussians import GaussianField, get_initializer
from ctrecon.core.io import Scan, load_volume, save_scan, save_volume
from ctrecon.core.units import hu_to_unit
from ctrecon.operators.projector import Projector
from ctrecon.operators.voxelize import quaternion_to_rotation
from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct
from priors.checkpoints import prior_metadata, save_prior
from priors.defaults import FIELD_OVERLAP, INIT_OVERLAP
from priors.data import DataConfig
from priors.model import CropGaussians, ModelConfig, build_model
from priors.zero_shot import SHIPPED_PRIORS, PriorInit, ZeroShotConfig, infer_field, load_zero_shot_prior, window_layout

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_abdomen_small.nii.gz"
SHIPPED = REPO / "data" / "priors"


class VoxelPrior(torch.nn.Module):
    """Stand-in prior: a Gaussian at every crop voxel centre, intensity ``gain``·value, σ ``sigma_voxels``
    (body axes, voxels) rotated by ``quat``, all in crop units. Requires every patch visible (no mask)."""

    def __init__(self, crop: int, sigma_voxels=(0.6, 0.6, 0.6), quat=(1.0, 0.0, 0.0, 0.0), gain=1.0):
        super().__init__()
        self.cfg = ModelConfig(architecture="medgmae", crop_size=crop, patch_size=crop // 2, encoder_dim=6,
                               encoder_heads=1, decoder_dim=6, decoder_heads=1, n_gaussians=crop ** 3)
        self.sigma = torch.tensor(sigma_voxels) / crop
        self.quat = torch.nn.functional.normalize(torch.tensor(quat, dtype=torch.float32), dim=0)
        self.gain = gain
        self.batch_sizes = []

    def forward(self, crops, mask=None):
        assert mask is None
        self.batch_sizes.append(crops.shape[0])
        B, D = crops.shape[0], self.cfg.crop_size
        c = (torch.arange(D, dtype=torch.float32) + 0.5) / D
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        means = torch.stack([xx, yy, zz], -1).reshape(1, -1, 3).expand(B, -1, -1)
        n = D ** 3
        return CropGaussians(means, self.sigma.expand(B, n, 3), self.quat.expand(B, n, 4),
                             self.gain * crops.reshape(B, -1))


def voxel_metadata(crop, spacing=(1.0, 1.0, 1.0), window=(-1024.0, 3071.0)):
    return {"architecture": "medgmae", "gaussians_per_level": [crop ** 3], "crop_size": [crop] * 3,
            "intensity_window_hu": list(window), "voxel_spacing_mm": list(spacing), "k_sigma": 3.0}


def smooth_volume(shape, seed=0):
    """Values in [0.05, 0.45] varying over a few voxels (a sum of random Gaussian bumps)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    out = np.zeros(shape)
    for _ in range(6):
        centre = rng.uniform(0, np.array(shape))
        width = rng.uniform(2.0, 4.0)
        out += rng.uniform(0.2, 1.0) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / (2 * width ** 2))
    return (0.05 + 0.4 * out / out.max()).astype(np.float32)


def test_stitched_field_equals_brute_force_sum_on_anisotropic_grid():
    """Centres on the voxel centres, intensities of those voxels, covariances diag(d)·RS²Rᵀ·diag(d)."""
    crop, s_voxels, quat = 6, np.array([0.7, 0.5, 0.9]), (0.9, 0.2, -0.3, 0.25)
    grid = VolumeGeometry((11, 14, 13), (2.0, 1.0, 1.5), (3.0, -2.0, 1.0))
    values = np.random.default_rng(1).uniform(0.0, 0.5, grid.nVoxel).astype(np.float32)
    prior = VoxelPrior(crop, s_voxels, quat)
    field = infer_field(torch.from_numpy(values), grid, prior, voxel_metadata(crop, (9.0, 9.0, 9.0)),
                        ZeroShotConfig(overlap=0.0, resample=False, min_intensity=0.0, batch_size=5))
    assert field.metadata["windows"]["per_axis"] == [2, 3, 3] and prior.batch_sizes == [5, 5, 5, 3]

    # Every voxel of the volume carries exactly one Gaussian at its centre with its value.
    centres = grid.voxel_centres().reshape(-1, 3)
    means = field.means.detach().double().numpy()
    inside = np.all(np.abs(grid.world_to_index(means) - np.rint(grid.world_to_index(means))) < 1e-4, axis=1)
    index = np.rint(grid.world_to_index(means)).astype(int)
    real = inside & np.all((index >= 0) & (index < np.array(grid.nVoxel[::-1])), axis=1)
    assert real.sum() == values.size
    np.testing.assert_allclose(field.intensities.detach().numpy()[real],
                               values[index[real, 2], index[real, 1], index[real, 0]], atol=1e-6)

    # The rendered field at interior points equals the brute-force sum with Σ = diag(d) R S² Rᵀ diag(d).
    rot = quaternion_to_rotation(torch.tensor(quat, dtype=torch.float64)).numpy()
    d_xyz = np.array(grid.dVoxel[::-1])
    cov = np.diag(d_xyz) @ rot @ np.diag(s_voxels ** 2) @ rot.T @ np.diag(d_xyz)
    precision = np.linalg.inv(cov)
    rendered = field.render(grid).detach().numpy()
    flat_values = values.reshape(-1).astype(np.float64)
    for k, j, i in [(5, 6, 6), (4, 7, 5), (6, 3, 9), (5, 10, 3), (3, 6, 6)]:
        diff = centres - grid.voxel_centres()[k, j, i]
        q = np.einsum("ni,ij,nj->n", diff, precision, diff)
        expected = np.sum(flat_values * np.exp(-0.5 * q) * (q <= 9.0))
        assert rendered[k, j, i] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_overlapping_windows_blend_to_the_non_overlapping_field():
    crop = 8
    grid = VolumeGeometry((9, 14, 13), (1.5, 1.5, 1.5))
    values = torch.from_numpy(smooth_volume(grid.nVoxel))
    prior, meta = VoxelPrior(crop), voxel_metadata(crop, (1.5, 1.5, 1.5))
    plain = infer_field(values, grid, prior, meta, ZeroShotConfig(overlap=0.0, min_intensity=0.0))
    blended = infer_field(values, grid, prior, meta, ZeroShotConfig(min_intensity=0.0, overlap=0.5))
    assert blended.metadata["windows"]["stride"] == 4
    assert len(blended) > 2 * len(plain)
    a, b = plain.render(grid).detach(), blended.render(grid).detach()
    interior = (slice(2, -2),) * 3  # padded positions differ between the layouts near the border
    torch.testing.assert_close(b[interior], a[interior], atol=1e-5, rtol=1e-5)
    # Blending weights at one position sum to one: total intensity per voxel centre is its value.
    index = np.rint(grid.world_to_index(blended.means.detach().double().numpy())).astype(int)
    ok = np.all((index >= 0) & (index < np.array(grid.nVoxel[::-1])), axis=1)
    sums = np.zeros(grid.nVoxel)
    np.add.at(sums, (index[ok, 2], index[ok, 1], index[ok, 0]), blended.intensities.detach().numpy()[ok])
    np.testing.assert_allclose(sums, values.numpy(), atol=1e-5)


@pytest.mark.parametrize("resample", [True, False])
def test_resampled_and_native_windows_reproduce_a_linear_volume(resample):
    """Trilinear resampling and a normalised splat (σ 0.7 voxel, a partition of unity to ~1e-4 when
    rendered to 5σ) both keep a linear ramp, so away from the padded border (7 mm) the field must equal
    the volume; a window or grid misplaced by a fraction of a voxel would show as an error of
    slope × shift (≥ 2e-3)."""
    crop, sigma = 8, 0.7
    grid = VolumeGeometry((14, 22, 20), (2.5, 1.2, 1.0), (4.0, 0.0, -3.0))
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid.nVoxel], indexing="ij")
    values = 0.1 + 0.02 * k + 0.015 * j + 0.01 * i
    prior = VoxelPrior(crop, (sigma,) * 3, gain=1.0 / (sigma * math.sqrt(2 * math.pi)) ** 3)
    field = infer_field(torch.from_numpy(values), grid, prior, voxel_metadata(crop, (2.0, 2.0, 2.0)),
                        ZeroShotConfig(resample=resample, min_intensity=0.0))
    work = field.metadata["work_grid"]
    assert work["dVoxel"] == ([2.0, 2.0, 2.0] if resample else list(grid.dVoxel))
    assert work["nVoxel"] == ([18, 14, 10] if resample else list(grid.nVoxel))
    rendered = field.render(grid, k_sigma=5.0).detach().numpy()
    interior = (slice(3, -3), slice(7, -7), slice(8, -8))
    assert np.abs(rendered - values)[interior].max() < 1e-3


def test_intensity_window_maps_back_to_unit_attenuation():
    crop = 6
    grid = VolumeGeometry((6, 12, 12), (1.0, 1.0, 1.0))
    hu = np.linspace(-400, 500, grid.nVoxel[2])[None, None, :] * np.ones(grid.nVoxel)
    unit = torch.from_numpy(hu_to_unit(hu).astype(np.float32))
    field = infer_field(unit, grid, VoxelPrior(crop), voxel_metadata(crop, window=(-175.0, 250.0)),
                        ZeroShotConfig(overlap=0.0, min_intensity=0.0))
    expected = (np.clip(hu, -175, 250) + 175) / 4095.0
    index = np.rint(grid.world_to_index(field.means.detach().double().numpy())).astype(int)
    np.testing.assert_allclose(field.intensities.detach().numpy(), expected[index[:, 2], index[:, 1], index[:, 0]],
                               atol=1e-6)
    assert "clip(u" in field.metadata["intensity_note"]


def test_pruning_skips_empty_windows_and_drops_faint_and_outside_gaussians():
    crop = 8
    grid = VolumeGeometry((8, 16, 24), (1.0, 1.0, 1.0))
    values = np.zeros(grid.nVoxel, dtype=np.float32)  # air everywhere except a block in one window
    values[2:6, 2:6, 2:6] = 0.3
    values[3, 3, 3] = 0.0005  # fainter than min_intensity
    prior = VoxelPrior(crop)
    field = infer_field(torch.from_numpy(values), grid, prior, voxel_metadata(crop), ZeroShotConfig(overlap=0.0))
    assert field.metadata["windows"]["total"] == 6 and field.metadata["windows"]["inferred"] == 1
    assert len(field) == 4 * 4 * 4 - 1 and bool((field.intensities >= 1e-3 * 0.999).all())
    # A Gaussian whose whole 3σ box lies outside the volume is dropped even when bright.
    lone = VolumeGeometry((5, 8, 8), (1.0, 1.0, 1.0))  # windows of 8 centred: z padded by 1 voxel each side
    plain = ZeroShotConfig(overlap=0.0)
    bright = np.full(lone.nVoxel, 0.3, dtype=np.float32)
    kept = infer_field(torch.from_numpy(bright), lone, VoxelPrior(crop, (0.15,) * 3), voxel_metadata(crop), plain)
    assert len(kept) == bright.size  # the padded planes (1 and 2 voxels out, 3σ = 0.45 voxel) are gone
    wider = infer_field(torch.from_numpy(bright), lone, VoxelPrior(crop, (0.2,) * 3), voxel_metadata(crop), plain)
    assert len(wider) == bright.size + 2 * 64  # 3σ = 0.6 voxel: the planes 1 voxel out reach in
    capped = infer_field(torch.from_numpy(bright), lone, VoxelPrior(crop), voxel_metadata(crop),
                         ZeroShotConfig(overlap=0.0, max_gaussians=50))
    assert len(capped) == 50


def test_window_layout_covers_the_grid_and_is_centred():
    grid = VolumeGeometry((30, 101, 122), (3.0, 3.0, 3.0))
    layout = window_layout(grid, 32)
    assert [len(s) for s in layout.starts] == [1, 4, 4] and layout.stride == 32
    assert layout.starts[0] == (-1,) and layout.pad_before == (1, 13, 3) and layout.pad_after == (1, 14, 3)
    overlapping = window_layout(grid, 32, overlap=0.25)
    assert overlapping.stride == 24 and [len(s) for s in overlapping.starts] == [1, 4, 5]
    for axis, n in enumerate(grid.nVoxel):
        starts = overlapping.starts[axis]
        assert starts[0] <= 0 and starts[-1] + 32 >= n


def tiny_prior_file(path, architecture="medgmae-star", crop=16, seed=0, spacing_mm=3.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(architecture=architecture, crop_size=crop, patch_size=8, encoder_dim=24, encoder_depth=1,
                      encoder_heads=2, decoder_dim=12, decoder_depth=1, decoder_heads=2, n_gaussians=8,
                      levels=(2, 3), max_scale=0.25)
    model = build_model(cfg)
    data_cfg = DataConfig(spacing_mm=spacing_mm, window_hu=(-1024.0, 3071.0), crop_size=crop)
    save_prior(path, model, prior_metadata(cfg, data_cfg, {"root": "test", "n_volumes": 0}, step=0))
    return path


def test_levels_batching_and_the_registered_initialisers(tmp_path):
    star = tiny_prior_file(tmp_path / "star.pt")
    single = tiny_prior_file(tmp_path / "single.pt", architecture="medgmae")
    model, meta = load_zero_shot_prior(star)
    grid = VolumeGeometry((20, 30, 28), (3.0, 3.0, 3.0))
    unit = torch.from_numpy(smooth_volume(grid.nVoxel, seed=5))
    one = infer_field(unit, grid, model, meta, ZeroShotConfig(overlap=0.0, min_intensity=0.0, batch_size=1))
    many = infer_field(unit, grid, model, meta, ZeroShotConfig(overlap=0.0, min_intensity=0.0, batch_size=32))
    first = infer_field(unit, grid, model, meta, ZeroShotConfig(overlap=0.0, min_intensity=0.0, levels="first"))
    windows = one.metadata["windows"]["inferred"]
    assert windows == 2 * 2 * 2
    assert one.metadata["gaussians"]["produced"] == windows * (8 + 16 + 24)
    assert first.metadata["gaussians"]["produced"] == windows * 8
    torch.testing.assert_close(one.render(grid), many.render(grid), atol=1e-5, rtol=1e-4)

    fdk = unit.clone()
    star_init = get_initializer(PriorInit(star, name="medgmae-star"))
    field = star_init(fdk, grid, 10_000, None)
    inferred = field.metadata["windows"]["inferred"]
    assert field.metadata["windows"]["stride"] == 8 and inferred > windows  # INIT_OVERLAP 0.5 of 16
    assert star_init(fdk, grid, 10_000, None, overlap=0.75).metadata["windows"]["stride"] == 4
    assert isinstance(field, GaussianField) and field.metadata["gaussians"]["produced"] == inferred * 48
    level0 = get_initializer(PriorInit(star, name="medgmae"))(fdk, grid, 10_000, None)
    assert level0.metadata["gaussians"]["produced"] == inferred * 8
    assert len(star_init(fdk, grid, 20, None)) == 20
    with pytest.raises(ValueError, match="needs a MedGMAE\\* prior"):
        get_initializer(PriorInit(single, name="medgmae-star"))(fdk, grid, 10_000, None)
    with pytest.raises(ValueError, match="prior not found"):
        PriorInit(tmp_path / "missing.pt")


def run_fresh_python(code: str) -> str:
    """stdout of ``code`` run by a new interpreter from the repository root (nothing imported before)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prior_initialisers_are_found_by_name_through_the_one_lazy_hook():
    """Importing the pipeline imports no ``priors``; the first look-up of a prior initialiser's name
    does (the hook in ctrecon.methods.gaussians.init), with no import by the caller."""
    out = run_fresh_python("""
        import json
        import sys
        from ctrecon.pipeline.reconstruct import reconstruct
        print(sorted(m for m in sys.modules if m == "priors" or m.startswith("priors.")))
        from ctrecon.methods.gaussians import available_initializers, get_initializer
        init = get_initializer("medgmae")
        print(type(init).__module__, type(init).__name__, init.name, init.prior, init.config.overlap)
        print(json.dumps(available_initializers()))
    """).splitlines()
    assert out[0] == "[]"
    assert out[1] == f"priors.zero_shot PriorInit medgmae None {INIT_OVERLAP}"
    assert {"fbp", "r2", "medgmae", "medgmae-star"} <= set(json.loads(out[2]))


def test_cli_shows_the_overlap_defaults_without_importing_torch():
    out = run_fresh_python("""
        import sys
        from ctrecon.cli import main
        for command in ("infer", "reconstruct"):
            try:
                main([command, "--help"])
            except SystemExit:
                pass
        print("torch imported:", "torch" in sys.modules)
    """)
    assert out.splitlines()[-1] == "torch imported: False"
    help_text = " ".join(out.split())
    assert f"[default: {FIELD_OVERLAP};" in help_text and f"window overlap, default {INIT_OVERLAP})" in help_text


@pytest.fixture()
def small_scan(tmp_path):
    """A 16³ volume of smooth bumps (3 mm voxels) and 20 cone-beam views of it."""
    grid = VolumeGeometry((16, 16, 16), (3.0, 3.0, 3.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=20)
    truth = smooth_volume(grid.nVoxel, seed=3)
    projections = Projector(geometry)(torch.as_tensor(truth)).numpy()
    return Scan(projections, geometry.angles, geometry, truth, {"case": "bumps"})


def test_reconstruct_takes_a_prior_initialiser_and_the_cli_its_checkpoint(tmp_path, small_scan):
    star = tiny_prior_file(tmp_path / "star.pt")
    config = ReconstructConfig.from_dict({"iterations": 1, "n_gaussians": 300})
    result = reconstruct(small_scan, init=PriorInit(star, overlap=0.75), config=config)
    assert result.init == "medgmae-star" and result.field.metadata["windows"]["stride"] == 4  # 0.75 of 16
    assert result.field.metadata["zero_shot"]["overlap"] == 0.75

    scan_path, run = tmp_path / "scan.npz", tmp_path / "run"
    save_scan(scan_path, small_scan)
    code, stdout, stderr = run_cli(["reconstruct", scan_path, "--init", "medgmae", "--prior", star, "--iters", "1",
                                    "--n-gaussians", "300", "--out", run, "--device", "cpu"])
    assert code == 0, stderr
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["init"] == "medgmae" and recorded["prior"] == str(star)
    field = GaussianField.load(run / "gaussians.npz")
    assert field.metadata["zero_shot"]["levels"] == "first" and field.metadata["windows"]["stride"] == 8
    code, _, stderr = run_cli(["reconstruct", scan_path, "--init", "medgmae", "--prior", tmp_path / "no.pt",
                               "--out", tmp_path / "run2"])
    assert code == 2 and "prior not found" in stderr and not (tmp_path / "run2").exists()
    garbage = tmp_path / "bad.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    volume = tmp_path / "ct.npy"
    np.save(volume, np.where(np.random.default_rng(0).random((12, 16, 16)) > 0.5, 40.0, -1000.0))
    for command in (["reconstruct", scan_path, "--init", "medgmae", "--prior", garbage, "--out", tmp_path / "run3"],
                    ["benchmark", volume, "--views", 12, "--inits", "fbp,medgmae", "--prior", garbage,
                     "--out", tmp_path / "bench"]):
        code, _, stderr = run_cli(command)
        assert code == 2 and stderr.count("\n") == 1 and "bad.pt" in stderr, stderr
    assert not (tmp_path / "run3").exists() and not (tmp_path / "bench").exists()  # refused before any work


def plane_errors(rendered: np.ndarray, reference: np.ndarray, axis: int) -> np.ndarray:
    """Mean |rendered − reference| of every plane perpendicular to ``axis``."""
    return np.abs(rendered - reference).mean(axis=tuple(a for a in range(3) if a != axis))


@pytest.mark.skipif(not (SHIPPED / SHIPPED_PRIORS["medgmae-star"]).is_file(), reason="shipped prior absent")
def test_shipped_prior_stitches_real_ct_without_seams():
    """A seam is an error tied to the window grid, not to the anatomy: the same CT region is stitched
    twice, with the window grid shifted by a quarter window, and on every plane where one layout has a
    window face its error is compared with the other layout's error on that same anatomical plane.
    The default blended layout shows no excess; the non-overlapping one (the check's negative
    control) does with these small CPU priors, whose Gaussian tails cross the window faces."""
    hu, spacing = load_volume(SAMPLE)
    region = hu_to_unit(hu)[:, 20:92, 13:117].astype(np.float32)  # 30×72×104 voxels at 3 mm
    model, meta = load_zero_shot_prior(SHIPPED / SHIPPED_PRIORS["medgmae-star"])
    size = meta["crop_size"][0]
    shift = size // 4

    def face_excess(overlap):
        errors, faces = {}, {}
        for offset in (0, shift):
            volume = region[:, offset:offset + 64, offset:offset + 96]  # 2×3 windows of 32 without overlap
            grid = VolumeGeometry(volume.shape, spacing)
            field = infer_field(torch.from_numpy(volume), grid, model, meta, ZeroShotConfig(overlap=overlap))
            rendered = field.render(grid).detach().numpy()
            layout = window_layout(grid, size, overlap)
            for axis in (1, 2):
                errors[offset, axis] = plane_errors(rendered, volume, axis)
                faces[offset, axis] = sorted({f + offset for s in layout.starts[axis] for f in (s, s + size)
                                              if 0 < f < volume.shape[axis]})
        ratios = []
        for mine, other in ((0, shift), (shift, 0)):
            for axis in (1, 2):
                for face in faces[mine, axis]:  # planes face-1 and face straddle it (region coordinates)
                    i, j = face - mine, face - other
                    if 1 <= j < len(errors[other, axis]):
                        ours, theirs = errors[mine, axis], errors[other, axis]
                        ratios.append(max(ours[i - 1], ours[i]) / max(theirs[j - 1], theirs[j]))
        return max(ratios), len(ratios)

    blended, count = face_excess(ZeroShotConfig().overlap)
    assert count >= 20 and blended < 1.5, blended
    seamed, count = face_excess(0.0)
    assert count >= 6 and seamed > 2.0, seamed


def test_cli_infer_writes_gaussians_and_rendering(tmp_path):
    prior = tiny_prior_file(tmp_path / "star.pt")
    grid = VolumeGeometry((10, 20, 18), (3.0, 3.0, 3.0))
    hu = smooth_volume(grid.nVoxel, seed=2) * 4095 - 1024
    volume = tmp_path / "ct.nii.gz"
    save_volume(volume, hu, grid.dVoxel, origin=(-100.0, 20.0, 5.0))
    out, render = tmp_path / "g" / "gaussians.npz", tmp_path / "r.nii.gz"
    code, stdout, stderr = run_cli(["infer", volume, "--prior", prior, "--out", out, "--render", render,
                                    "--device", "cpu"])
    assert code == 0, stderr
    field = GaussianField.load(out)
    assert len(field) > 0 and "prior" in field.metadata
    rendered, spacing = load_volume(render)
    assert rendered.shape == grid.nVoxel and spacing == pytest.approx(grid.dVoxel)
    expected = GaussianField.load(out).render(grid).detach().numpy() * 4095 - 1024  # scan frame: centred grid
    np.testing.assert_allclose(rendered, expected, atol=0.05)
    assert "Gaussians" in stdout and str(out) in stdout

    code, _, stderr = run_cli(["infer", volume, "--prior", tmp_path / "nope.pt", "--out", tmp_path / "x.npz"])
    assert code == 2 and "checkpoint not found" in stderr and not (tmp_path / "x.npz").exists()
    code, _, stderr = run_cli(["infer", volume, "--prior", prior, "--out", tmp_path / "x.txt"])
    assert code == 2 and ".npz" in stderr
    (tmp_path / "blocker").write_text("a file where a folder should be")
    out.write_bytes(b"an earlier result")
    code, _, stderr = run_cli(["infer", volume, "--prior", prior, "--out", out, "--render",
                               tmp_path / "blocker" / "r.nii.gz", "--device", "cpu"])
    assert code == 2 and stderr.count("\n") == 1 and "blocker" in stderr, stderr
    assert out.read_bytes() == b"an earlier result"  # left as it was: no new .npz without its rendering
    assert sorted(p.name for p in out.parent.iterdir()) == ["gaussians.npz"]


def test_a_prior_spacing_too_fine_for_the_memory_is_refused_before_resampling(tmp_path):
    fine = tiny_prior_file(tmp_path / "fine.pt", spacing_mm=0.01)
    grid = VolumeGeometry((10, 20, 18), (3.0, 3.0, 3.0))
    save_volume(tmp_path / "ct.nii.gz", smooth_volume(grid.nVoxel, seed=2) * 4095 - 1024, grid.dVoxel)
    code, _, err = run_cli(["infer", tmp_path / "ct.nii.gz", "--prior", fine, "--out", tmp_path / "g.npz",
                            "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1 and "3000x6000x5400 voxels at 0.01 mm" in err, err
    assert "no resampling" in err and not (tmp_path / "g.npz").exists()


def _tampered(meta=None, state=None):
    def change(payload):
        metadata = json.loads(payload["metadata"])
        if meta:
            meta(metadata)
        payload["metadata"] = json.dumps(metadata)
        if state:
            state(payload["state_dict"])
    return change


@pytest.mark.parametrize("change, message", [
    (_tampered(meta=lambda m: m.pop("config")), "metadata field config must be an object"),
    (_tampered(meta=lambda m: m.update(voxel_spacing_mm=[0, 3, 3])), "voxel_spacing_mm must be 3 positive numbers"),
    (_tampered(meta=lambda m: m.update(crop_size=[16.5] * 3)), "crop_size must be 3 positive integers"),
    (_tampered(meta=lambda m: m.update(intensity_window_hu=[300, -100])), "intensity_window_hu must be"),
    (_tampered(meta=lambda m: m.update(gaussians_per_level="many")), "gaussians_per_level must be"),
    (_tampered(meta=lambda m: m["config"].update(encoder_dim="wide")), "model config cannot be built"),
    (_tampered(state=lambda s: s.update(extra=torch.zeros(2))), "1 unexpected, e.g. \\['extra'\\]"),
    (_tampered(state=lambda s: s.pop(next(iter(s)))), "1 missing"),
    (_tampered(state=lambda s: s[next(iter(s))].fill_(float("inf"))), "non-finite values .*damaged"),
    (_tampered(state=lambda s: s.update({k: torch.zeros(3) for k in list(s)[:1]})), "has shape \\(3,\\)"),
    (lambda payload: payload.update(metadata="{not json"), "metadata is missing or not JSON"),
])
def test_damaged_or_foreign_prior_files_are_refused_with_the_field_named(tmp_path, change, message):
    path = tiny_prior_file(tmp_path / "prior.pt")
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    with pytest.raises(InputError, match=message) as refused:
        load_zero_shot_prior(path)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400
