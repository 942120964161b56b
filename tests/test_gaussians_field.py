"""GaussianField: activations, covariances, file formats (npz, PLY), row surgery, rendering."""
import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ctrecon.core.errors import InputError
from ctrecon.methods.gaussians import GROUP_NAMES, GaussianField, voxelize
from ctrecon.core.geometry import VolumeGeometry


def make_field(n=6, activation="softplus", seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 3
    scales = torch.rand(n, 3, generator=g) + 0.5
    quats = torch.randn(n, 4, generator=g)
    intensities = torch.rand(n, generator=g) * 0.8 + 0.1
    field = GaussianField.from_values(means, scales, quats, intensities, intensity_activation=activation,
                                      metadata={"initializer": "test", "volume": [1, 2, 3]})
    return field, (means, scales, quats, intensities)


@pytest.mark.parametrize("activation", ["softplus", "sigmoid", "identity"])
def test_from_values_round_trips_physical_values(activation):
    field, (means, scales, quats, intensities) = make_field(activation=activation)
    assert len(field) == 6 and field.intensity_activation == activation
    torch.testing.assert_close(field.means, means)
    torch.testing.assert_close(field.scales, scales)
    torch.testing.assert_close(field.intensities, intensities)
    torch.testing.assert_close(field.rotations, quats / quats.norm(dim=-1, keepdim=True))
    assert torch.allclose(field.rotations.norm(dim=-1), torch.ones(6))


def test_covariances_match_scipy_rotation():
    field, (_, scales, quats, _) = make_field()
    rot = Rotation.from_quat(quats.numpy()[:, [1, 2, 3, 0]]).as_matrix()
    expect = rot @ np.einsum("ni,nij->nij", scales.numpy() ** 2, np.swapaxes(rot, 1, 2))
    np.testing.assert_allclose(field.covariances().detach().numpy(), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(field.rotation_matrices().detach().numpy(), rot, atol=1e-6)


def test_activations_are_what_they_claim():
    field, _ = make_field(activation="softplus")
    torch.testing.assert_close(field.intensities, torch.log1p(torch.exp(field.raw_intensities)))
    field, _ = make_field(activation="sigmoid")
    torch.testing.assert_close(field.intensities, torch.sigmoid(field.raw_intensities))


def test_invalid_values_raise_input_error():
    means, scales, quats = torch.zeros(2, 3), torch.ones(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2)
    with pytest.raises(InputError, match=">= 0"):
        GaussianField.from_values(means, scales, quats, torch.tensor([0.1, -0.2]))
    with pytest.raises(InputError, match="< 1"):
        GaussianField.from_values(means, scales, quats, torch.tensor([0.1, 1.5]), intensity_activation="sigmoid")
    with pytest.raises(InputError, match="positive"):
        GaussianField.from_values(means, -scales, quats, torch.tensor([0.1, 0.2]))
    with pytest.raises(InputError, match="activation"):
        GaussianField.from_values(means, scales, quats, torch.tensor([0.1, 0.2]), intensity_activation="relu")
    with pytest.raises(InputError, match="quats"):
        GaussianField(means, scales.log(), quats[:1], torch.zeros(2))


def test_render_is_voxelize_of_activated_values():
    field, _ = make_field()
    volume = VolumeGeometry((6, 7, 8), (1.0, 1.0, 1.0))
    expect = voxelize(field.means, field.scales, field.rotations, field.intensities, volume, 2.5)
    torch.testing.assert_close(field.render(volume, 2.5), expect)
    points = torch.as_tensor(volume.voxel_centres().reshape(-1, 3), dtype=torch.float32)
    torch.testing.assert_close(field.render_points(points, 2.5), expect.reshape(-1), atol=1e-6, rtol=1e-5)
    field.render(volume).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in field.raw_parameters().values())


def test_save_load_round_trip_without_pickles(tmp_path):
    field, _ = make_field(activation="sigmoid")
    path = tmp_path / "field.npz"
    field.save(path)
    with np.load(path, allow_pickle=False) as data:  # loads without pickles
        meta = json.loads(str(data["metadata"]))
        assert data["means"].dtype == np.float32
    assert meta["intensity_activation"] == "sigmoid" and meta["num_gaussians"] == 6
    loaded = GaussianField.load(path)
    assert loaded.intensity_activation == "sigmoid" and loaded.metadata == field.metadata
    for name, param in field.raw_parameters().items():
        torch.testing.assert_close(loaded.raw_parameters()[name], param.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["field.npz"]  # no temporary left behind


def test_non_finite_gaussians_are_neither_written_nor_read(tmp_path):
    field, _ = make_field()
    path = tmp_path / "field.npz"
    path.write_bytes(b"an earlier field")
    with torch.no_grad():
        field.means[2, 1] = float("nan")
        field.log_scales[4, 0] = float("inf")
    with pytest.raises(InputError, match="1 Gaussian\\(s\\) have non-finite means"):
        field.save(path)
    assert path.read_bytes() == b"an earlier field" and len(list(tmp_path.iterdir())) == 1
    good, _ = make_field()
    good.save(path)
    with np.load(path) as data:  # a file damaged after writing (NaN centres) is refused on reading
        arrays = {name: np.array(data[name]) for name in data.files}
    arrays["means"][0] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(InputError, match="field.npz: 1 Gaussian\\(s\\) have non-finite means"):
        GaussianField.load(path)


def test_load_rejects_foreign_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        GaussianField.load(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, means=np.zeros((1, 3)), metadata=np.array(json.dumps({"format": "something"})))
    with pytest.raises(InputError, match="not a ctrecon Gaussian file"):
        GaussianField.load(other)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a ctrecon Gaussian file"):
        GaussianField.load(broken)


def read_ply(path):
    """Minimal independent PLY reader: header lines, then a float32 little-endian record array."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    names = [line.split()[2] for line in header if line.startswith("property")]
    assert all(line.split()[1] == "float" for line in header if line.startswith("property"))
    body = np.frombuffer(raw[end:], dtype=np.dtype([(n, "<f4") for n in names]))
    assert body.shape == (count,)
    return names, body


def test_ply_layout_and_values(tmp_path):
    field, (means, scales, quats, intensities) = make_field()
    path = tmp_path / "field.ply"
    field.to_ply(path)
    names, body = read_ply(path)
    assert names[:6] == ["x", "y", "z", "nx", "ny", "nz"]
    for required in ["f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
                     "rot_0", "rot_1", "rot_2", "rot_3", "intensity"]:
        assert required in names
    np.testing.assert_allclose(np.stack([body["x"], body["y"], body["z"]], 1), means.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(np.stack([body[f"scale_{i}"] for i in range(3)], 1)), scales.numpy(),
                               rtol=1e-5)
    unit = quats / quats.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(np.stack([body[f"rot_{i}"] for i in range(4)], 1), unit.numpy(), atol=1e-6)
    np.testing.assert_allclose(body["intensity"], intensities.numpy(), rtol=1e-5)
    brightest = int(np.argmax(body["intensity"]))
    assert 1 / (1 + np.exp(-body["opacity"][brightest])) == pytest.approx(1.0, abs=1e-5)


def test_select_and_append_rows():
    field, (means, *_rest) = make_field()
    keep = torch.tensor([True, False, True, True, False, True])
    field.select(keep)
    assert len(field) == 4 and all(p.shape[0] == 4 for p in field.raw_parameters().values())
    torch.testing.assert_close(field.means, means[keep])
    rows = {name: p.detach()[:2].clone() for name, p in field.raw_parameters().items()}
    field.append(rows)
    assert len(field) == 6
    torch.testing.assert_close(field.means[4:], means[keep][:2])
    with pytest.raises(InputError, match="append needs"):
        field.append({"means": rows["means"]})
    with pytest.raises(InputError, match="mask"):
        field.select(torch.tensor([True]))


def test_parameter_groups_are_named():
    field, _ = make_field()
    groups = field.parameter_groups({"means": 0.1, "intensities": 0.05, "log_scales": 0.01, "quats": 0.001})
    assert {g["name"] for g in groups} == set(GROUP_NAMES)
    by_name = {g["name"]: g for g in groups}
    assert by_name["intensities"]["params"][0] is field.raw_intensities and by_name["means"]["lr"] == 0.1
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    assert len(optimizer.param_groups) == 4
    with pytest.raises(InputError, match="unknown parameter group"):
        field.parameter_groups({"xyz": 0.1})
