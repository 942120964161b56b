"""priors.pretrain and ``ctrecon pretrain``: schedule, resumability, DDP (2 gloo processes), CLI."""
import csv
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ctrecon.core.errors import InputError
from priors.checkpoints import load_prior, load_state, read_metadata
from priors.data import DataConfig
from priors.model import build_model, model_config
from priors.pretrain import TrainConfig, lr_factor, parameter_groups, pretrain

TINY = dict(crop_size=32, patch_size=8)
DATA = DataConfig(crops_per_volume=2)
#: The DDP test's model: a variable mask ratio, whose per-step draw every process and micro-step must share.
DDP_MODEL = model_config("tiny", drop_path=0.0, mask_ratio_range=(0.1, 0.6), **TINY)


@pytest.fixture(scope="module")
def volume_folder(tmp_path_factory):
    """One synthetic CT-like NIfTI (HU): air, a body ellipsoid, a bone rod, 1.5 mm voxels."""
    from ctrecon.core.io import save_volume

    folder = tmp_path_factory.mktemp("volumes")
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 48, 48)], indexing="ij")
    hu = np.full(z.shape, -1000.0, np.float32)
    hu[(x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1] = 40.0
    hu[(x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.02] = 700.0
    save_volume(folder / "case.nii.gz", hu, (1.5, 1.5, 1.5))
    return folder


def _losses(out):
    with open(out / "log.csv", newline="") as handle:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(handle)]


def test_lr_schedule_and_parameter_groups():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert TrainConfig(steps=100_000).warmup == 2000
    model = build_model(model_config("tiny", "medgmae-star", **TINY))
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    for name in ("query_tokens", "encoder.cls_token", "levels.0.child_tokens", "encoder.norm.weight",
                 "heads.scale.bias"):
        assert name in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(volume_folder, tmp_path):
    cfg = model_config("tiny", **TINY)  # stochastic depth on: the RNG state must be restored too
    train = TrainConfig(steps=4, batch=2, checkpoint_every=2, log_every=1, preview_every=4, workers=0, seed=1)
    full = pretrain(volume_folder, tmp_path / "full", cfg, DATA, train)
    assert full["final_loss"] == pytest.approx(_losses(tmp_path / "full")[-1][1])

    def stop_after_three(step, total, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(volume_folder, tmp_path / "split", cfg, DATA, train, progress=stop_after_three)
    assert load_state(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    stopped = read_metadata(tmp_path / "split" / "prior.pt")["training"]
    assert stopped["steps"] == 2 and stopped["configured_steps"] == 4  # the steps done, not the configured total
    with pytest.raises(InputError):  # refuses to overwrite a run without --resume
        pretrain(volume_folder, tmp_path / "split", cfg, DATA, train)
    with pytest.raises(InputError):  # refuses another architecture
        pretrain(volume_folder, tmp_path / "split", model_config("tiny", "voxel-mae", **TINY), DATA, train, resume=True)
    resumed = pretrain(volume_folder, tmp_path / "split", cfg, DATA, train, resume=True)
    assert resumed["resumed"] and resumed["start_step"] == 2
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert [r[0] for r in b] == list(range(1, 5))
    np.testing.assert_allclose([r[1:] for r in b], [r[1:] for r in a], rtol=1e-6)
    model_a, meta = load_prior(tmp_path / "full" / "prior.pt")
    model_b, _ = load_prior(tmp_path / "split" / "prior.pt")
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)
    assert meta["training"]["steps"] == 4 and meta["training_data"]["n_volumes"] == 1
    assert meta["intensity_window_hu"] == [-175.0, 250.0] and meta["voxel_spacing_mm"] == [1.5] * 3
    assert [p.name for p in (tmp_path / "full" / "previews").glob("*.png")] == ["step_0000004.png"]
    assert read_metadata(tmp_path / "full" / "encoder_monai.pt")["monai_vit_kwargs"]["hidden_size"] == 96


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out, train):  # what torchrun sets up, per process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pretrain(data, out, DDP_MODEL, DATA, train, device="cpu")


def test_two_process_ddp_with_accumulation_matches_one_process(volume_folder, tmp_path):
    cfg = DDP_MODEL
    train = TrainConfig(steps=3, batch=4, checkpoint_every=0, log_every=1, preview_every=0, workers=0, seed=2)
    pretrain(volume_folder, tmp_path / "single", cfg, DATA, train)
    ddp_train = TrainConfig(**{**train.to_dict(), "accum": 2})  # 2 processes × 2 micro-batches of 1 crop
    mp.spawn(_ddp_worker, args=(2, _free_port(), volume_folder, tmp_path / "ddp", ddp_train), nprocs=2, join=True)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    np.testing.assert_allclose([r[1] for r in ddp], [r[1] for r in single], rtol=1e-4)
    assert read_metadata(tmp_path / "ddp" / "prior.pt")["training"]["processes"] == 2
    model_single, _ = load_prior(tmp_path / "single" / "prior.pt")
    model_ddp, _ = load_prior(tmp_path / "ddp" / "prior.pt")
    for (name, a), b in zip(model_single.state_dict().items(), model_ddp.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


def test_cli_pretrain(volume_folder, tmp_path, capsys):
    from ctrecon.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(volume_folder), "--config", "tiny", "--model", "medgmae-star", "--out", str(out),
              "--steps", "2", "--batch", "2", "--crop-size", "32", "--workers", "0", "--window", "unit",
              "--device", "cpu"])
    assert exit_info.value.code == 0
    meta = read_metadata(out / "prior.pt")
    assert meta["architecture"] == "medgmae-star" and meta["intensity_window_hu"] == [-1024.0, 3071.0]
    assert meta["gaussians_per_level"] == [64, 128, 256]
    assert "prior:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(tmp_path / "nothing"), "--config", "tiny", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(volume_folder), "--config", "tiny", "--out", str(tmp_path / "y"),
              "--window", "250,-175"])
    assert exit_info.value.code == 2 and not (tmp_path / "y").exists()
    # the MDAE-style options reach the prior's metadata
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--data", str(volume_folder), "--config", "tiny", "--out", str(tmp_path / "mdae"), "--steps", "1",
              "--batch", "2", "--crop-size", "32", "--workers", "0", "--window", "unit", "--device", "cpu",
              "--gaussian-tokens", "patches", "--mask-ratio-range", "0,0.5", "--corruption", "fdk", "--fdk-dose", "1e4,1e5",
              "--cache", str(tmp_path / "cache")])
    assert exit_info.value.code == 0
    meta = read_metadata(tmp_path / "mdae" / "prior.pt")
    assert meta["config"]["gaussian_tokens"] == "patches" and meta["config"]["mask_ratio_range"] == [0.0, 0.5]
    assert meta["input_corruption"]["fdk_dose"] == [1e4, 1e5]


@pytest.mark.parametrize("options,message", [
    (["--fdk-dose", "1e4,1e5"], "--fdk-dose needs --corruption fdk"),
    (["--corruption", "fdk", "--fdk-dose", "1e4"], "--fdk-dose must be LOW,HIGH"),
    (["--corruption", "fdk", "--fdk-dose", "1e5,1e4"], "fdk_dose must be"),
    (["--mask-ratio-range", "0.6,0.2"], "mask_ratio_range must be"),
    (["--mask-ratio-range", "a,b"], "--mask-ratio-range must be LOW,HIGH"),
    (["--window", "250"], "--window (HU, or 'unit') must be LOW,HIGH"),
])
def test_cli_pretrain_bad_mdae_options_are_one_line(volume_folder, tmp_path, options, message):
    from cli_helpers import run_cli

    code, _, err = run_cli(["pretrain", "--data", volume_folder, "--config", "tiny", "--out", tmp_path / "run",
                            "--crop-size", "32", "--workers", "0", *options])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_pretrain_bad_volume_in_a_worker_is_one_line(volume_folder, tmp_path):
    """A corrupt volume met by a DataLoader worker process: its own one-line error, not the worker's traceback."""
    import shutil

    from cli_helpers import run_cli

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(volume_folder / "case.nii.gz", data / "a.nii.gz")
    intact = (volume_folder / "case.nii.gz").read_bytes()
    (data / "b.nii.gz").write_bytes(intact[:-8] + bytes(b ^ 0x5A for b in intact[-8:]))  # trailer damaged
    code, _, err = run_cli(["pretrain", "--data", data, "--config", "tiny", "--out", tmp_path / "run", "--steps", 2,
                            "--batch", 2, "--crop-size", 32, "--workers", 2, "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1 and "b.nii.gz is corrupt" in err, err
    assert not (tmp_path / "run").exists()


def test_pretrain_failing_before_its_first_checkpoint_leaves_nothing(volume_folder, tmp_path, monkeypatch):
    """A failure after training started but before any checkpoint (here a full disk at the first one) takes
    back config.json, log.csv and previews; files that were in --out before stay."""
    import errno

    import priors.pretrain as pretrain_module
    from cli_helpers import run_cli

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrain_module, "save_state", disk_full)
    options = ["--data", volume_folder, "--config", "tiny", "--steps", 2, "--batch", 2, "--crop-size", 32,
               "--workers", 0, "--log-every", 1, "--preview-every", 1, "--device", "cpu"]
    code, _, err = run_cli(["pretrain", *options, "--out", tmp_path / "run"])
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert code == 1 and last.startswith("ctrecon: error: ") and "No space left" in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    code, _, err = run_cli(["pretrain", *options, "--out", tmp_path / "mine"])
    assert code == 1, err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_corrupted_input_loss_covers_the_visible_voxels_and_trains(volume_folder, tmp_path):
    """With a corrupted input the target's visible part matters too (it is no longer a copy of the input);
    without one only the masked voxels count. A noise-corrupted run trains and records its corruption."""
    from priors.model import patchify, random_patch_mask, unpatchify

    cfg = model_config("tiny", "medgmae", **TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    crops = torch.rand(2, 1, 32, 32, 32)
    mask = random_patch_mask([1, 2], cfg.n_patches, cfg.n_patches - cfg.n_visible)
    visible = ~mask[:, :, None].expand(-1, -1, 8 ** 3)
    changed = unpatchify(torch.where(visible, patchify(crops, 8) + 0.5, patchify(crops, 8)), 8, cfg.grid)
    with torch.no_grad():
        noisy = crops + 0.05 * torch.randn_like(crops)
        predicted = model(crops, mask)
        # the plain loss counts the masked voxels only; with a corrupted input, every voxel
        assert model.forward_loss(changed, predicted, mask) == model.forward_loss(crops, predicted, mask)
        assert model.loss(changed, mask, noisy) != model.loss(crops, mask, noisy)
        voxel_mae = build_model(model_config("tiny", "voxel-mae", **TINY))   # the ablation's baseline takes it too
        voxel_predicted = voxel_mae(crops, mask)
        assert voxel_mae.forward_loss(changed, voxel_predicted, mask) == voxel_mae.forward_loss(crops, voxel_predicted, mask)
        assert voxel_mae.loss(changed, mask, noisy) != voxel_mae.loss(crops, mask, noisy)
    train = TrainConfig(steps=2, batch=2, lr=1e-3, warmup_steps=1, checkpoint_every=0, preview_every=0, workers=0)
    summary = pretrain(volume_folder, tmp_path / "run", cfg, DataConfig(crops_per_volume=2, corruption="noise"),
                       train, device="cpu")
    assert math.isfinite(summary["final_loss"])
    assert read_metadata(tmp_path / "run" / "prior.pt")["input_corruption"] == {"kind": "noise", "noise_sigma_max": 0.1}
    # the FDK-corrupted data order (noisy scans), per-step mask ratios and the patch-token decoder survive an
    # interruption exactly (inputs from the cache on resume)
    fdk_data = DataConfig(crops_per_volume=2, corruption="fdk", fdk_views=(30, 60), fdk_variants=2, fdk_dose=(1e4, 1e5))
    cfg = model_config("tiny", "medgmae", gaussian_tokens="patches", mask_ratio_range=(0.0, 0.5), **TINY)
    train = TrainConfig(steps=3, batch=2, checkpoint_every=1, log_every=1, preview_every=0, workers=0, seed=2)
    pretrain(volume_folder, tmp_path / "full", cfg, fdk_data, train, cache_dir=tmp_path / "cache")

    def stop_after_two(step, total, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(volume_folder, tmp_path / "split", cfg, fdk_data, train, cache_dir=tmp_path / "cache",
                 progress=stop_after_two)
    pretrain(volume_folder, tmp_path / "split", cfg, fdk_data, train, cache_dir=tmp_path / "cache", resume=True)
    np.testing.assert_allclose([r[1] for r in _losses(tmp_path / "split")], [r[1] for r in _losses(tmp_path / "full")],
                               rtol=1e-6)
    corruption = read_metadata(tmp_path / "full" / "prior.pt")["input_corruption"]
    assert corruption["fdk_views"] == [30, 60] and corruption["fdk_dose"] == [1e4, 1e5]
