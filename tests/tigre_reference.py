"""An independent, pure-numpy model of TIGRE's cone-beam geometry, read from TIGRE's source.

Nothing here imports ctrecon: it is the oracle the TIGRE-adapter tests compare ctrecon against.
It follows TIGRE at commit ``TIGRE_COMMIT`` (github.com/CERN/TIGRE), in float64 where TIGRE works
in float32:

- Python/tigre/utilities/geometry.py ``Geometry.check_geo`` / ``__check_and_repmat__``: angles of
  shape (A,) become (A, 3) Euler triples (alpha, 0, 0); DSO, DSD, COR become per-angle (A,),
  offOrigin (A, 3), offDetector (A, 2), rotDetector (A, 3); missing optional fields default to 0.
  No sign flip or reordering of angles or offsets happens on the Python side.
- Python/tigre/utilities/cuda_interface/_types.pxd ``convert_to_c_geometry``: TIGRE's Python
  tuples are (z, y, x) for nVoxel/sVoxel/dVoxel/offOrigin (nVoxelX = nVoxel[2], offOrigX =
  offOrigin[:, 2], ...) and (v, u) for nDetector/dDetector/offDetector (nDetecU = nDetector[1],
  offDetecU = offDetector[:, 1]); rotDetector[:, 0] -> dYaw, [:, 1] -> dPitch, [:, 2] -> dRoll.
- Python/tigre/utilities/cuda_interface/_Ax.pyx: the image is passed as a C-contiguous
  ``[Z, Y, X]`` array, so X is the fastest memory axis = CUDA texture x
  (Common/CUDA/ray_interpolated_projection.cu ``CreateTextureInterp``: extent (nVoxelX, nVoxelY,
  nVoxelZ)); the result is returned as ``[A, nDetector[0], nDetector[1]] = [A, V, U]`` with U
  fastest (kernel index ``v*nDetecU + u`` when IS_FOR_MATLAB_TIGRE is 0, the Python build).
- Common/CUDA/ray_interpolated_projection.cu ``computeDeltas`` + ``kernelPixelDetector``,
  ``rollPitchYaw``, ``eulerZYZ`` (forward projector; Siddon_projection.cu ``computeDeltas_Siddon``
  is the same geometry, with voxel boundaries instead of centres on the integer grid).
- Common/CUDA/voxel_backprojection.cu ``computeDeltasCube`` + ``kernelPixelBackprojectionFDK``,
  ``eulerZYZT``, ``rollPitchYawT`` (backprojector: voxel -> detector (u, v)), used here as a
  second, independent reading (``tigre_voxel_to_detector``).

Frames. TIGRE's CUDA code works in the *image frame*: units of voxels, origin at the centre of
voxel ``img[0, 0, 0]``, axes along the image's i (X, last array axis), j (Y), k (Z, first array
axis). ``tigre_rays`` returns the same frame in mm, so voxel ``img[k, j, i]`` sits at
``(i·dx, j·dy, k·dz)`` (``tigre_voxel_centres``). With ``frame="world"`` everything is shifted by
``offOrigin - (sVoxel - dVoxel)/2`` (per angle): the frame in which TIGRE's rotation axis is the z
axis through the origin and the image centre sits at +offOrigin.
"""
from __future__ import annotations

import numpy as np

TIGRE_COMMIT = "e70247328fd897ca5dee1351893b66efe741dc73"  # CERN/TIGRE master, 2026-06-25 (merge of PR #752)

__all__ = ["TIGRE_COMMIT", "tigre_rays", "tigre_voxel_centres", "tigre_voxel_to_detector", "tigre_angles",
           "tigre_check_geo", "tigre_image_origin_in_world"]


# --------------------------------------------------------------------------- geo normalisation
def tigre_angles(angles) -> np.ndarray:
    """(A, 3) Euler angles (alpha, theta, psi), as geometry.py ``check_geo`` builds ``geo.angles``."""
    angles = np.atleast_1d(np.asarray(angles, dtype=np.float64))
    if angles.ndim == 1:                                   # check_geo: (A,) -> columns (angles, 0, 0)
        return np.stack([angles, np.zeros_like(angles), np.zeros_like(angles)], axis=1)
    if angles.ndim == 2 and angles.shape[1] == 3:          # check_geo: (A, 3) is taken as is
        return angles.copy()
    raise ValueError(f"TIGRE angles must be (A,) or (A, 3), got {angles.shape}")


def _per_angle(geo, name: str, n: int, width: int | None, default) -> np.ndarray:
    """geometry.py ``__check_and_repmat__``: one value is tiled over the angles, per-angle values are kept.

    Returns shape (n,) when width is None (DSO, DSD, COR) else (n, width) (offOrigin, offDetector,
    rotDetector). A missing optional field is zeros, as ``check_geo`` sets it.
    """
    value = getattr(geo, name, None)
    value = np.asarray(default if value is None else value, dtype=np.float64)
    if width is None and value.size in (1, n):
        return np.broadcast_to(value.reshape(-1), (n,)).copy()
    if width is not None and value.shape == (width,):
        return np.tile(value, (n, 1))
    if width is not None and value.shape == (n, width):
        return value.copy()
    raise ValueError(f"geo.{name} with shape {value.shape} is not one TIGRE's check_geo accepts for {n} angles")


def _volume(geo):
    """(n, d, s) of the image in (x, y, z) order (_types.pxd: X = index 2, Z = index 0)."""
    n = np.asarray(geo.nVoxel, dtype=np.float64)[::-1]
    d = np.asarray(geo.dVoxel, dtype=np.float64)[::-1]
    # If sVoxel is given TIGRE uses it (not n·d) for the corner shift; check_geo demands |n·d - s| < 1e-6.
    s_zyx = getattr(geo, "sVoxel", None)
    s = n * d if s_zyx is None else np.asarray(s_zyx, dtype=np.float64)[::-1]
    return n, d, s


# --------------------------------------------------------------------------- rotations
def _rz(a):
    c, s, z, o = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _ry(a):
    c, s, z, o = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rx(a):
    c, s, z, o = np.cos(a), np.sin(a), np.zeros_like(a), np.ones_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def _euler_zyz(eul):
    """ray_interpolated_projection.cu ``eulerZYZ``: written out, its matrix is Rz(alpha)·Ry(theta)·Rz(psi).

    For theta = psi = 0 it maps (x, y) -> (cos a·x - sin a·y, sin a·x + cos a·y): a counter-clockwise
    rotation by alpha about +z (seen from +z), applied to the source and detector (the image never rotates).
    """
    return _rz(eul[:, 0]) @ _ry(eul[:, 1]) @ _rz(eul[:, 2])


def _roll_pitch_yaw(rot):
    """ray_interpolated_projection.cu ``rollPitchYaw``: written out, Rz(dRoll)·Ry(dPitch)·Rx(dYaw).

    _types.pxd maps geo.rotDetector[:, 0] -> dYaw (about x, the detector normal at alpha=0, i.e. an
    in-plane rotation), [:, 1] -> dPitch (about y), [:, 2] -> dRoll (about z).
    """
    return _rz(rot[:, 2]) @ _ry(rot[:, 1]) @ _rx(rot[:, 0])


def _fields(geo, angles):
    eul = tigre_angles(angles)
    n = eul.shape[0]
    return dict(
        eul=eul,
        DSO=_per_angle(geo, "DSO", n, None, 0.0),
        DSD=_per_angle(geo, "DSD", n, None, 0.0),
        COR=_per_angle(geo, "COR", n, None, 0.0),
        offOrigin=_per_angle(geo, "offOrigin", n, 3, np.zeros(3)),      # (z, y, x) per angle
        offDetector=_per_angle(geo, "offDetector", n, 2, np.zeros(2)),  # (v, u) per angle
        rotDetector=_per_angle(geo, "rotDetector", n, 3, np.zeros(3)),
    )


def tigre_image_origin_in_world(geo, angles) -> np.ndarray:
    """[A, 3] world position (x, y, z) of the centre of voxel img[0, 0, 0]: offOrigin - (sVoxel - dVoxel)/2."""
    f = _fields(geo, angles)
    _, d, s = _volume(geo)
    return f["offOrigin"][:, ::-1] - (s - d) / 2.0


# --------------------------------------------------------------------------- forward projector
def tigre_rays(geo, angles, frame: str = "image"):
    """Source ``[A, 3]`` and pixel centres ``[A, V, U, 3]`` (mm, x y z) of TIGRE's projection array.

    ``pixels[a, r, c]`` is the centre of the pixel that ``tigre.Ax(img, geo, angles)[a, r, c]``
    integrates along (from ``source[a]``). ``frame="image"``: origin at the centre of voxel
    ``img[0, 0, 0]`` (voxel ``img[k, j, i]`` at ``(i·dx, j·dy, k·dz)``); ``frame="world"``: see the
    module docstring.
    """
    f = _fields(geo, angles)
    eul, DSO, DSD, COR = f["eul"], f["DSO"], f["DSD"], f["COR"]
    nV, nU = (int(x) for x in np.asarray(geo.nDetector).reshape(-1))   # _types.pxd: nDetecV = [0], nDetecU = [1]
    dV, dU = (float(x) for x in np.asarray(geo.dDetector, dtype=np.float64).reshape(-1))
    _, d, s = _volume(geo)

    # kernelPixelDetector: output row r (array axis 1) is detector row pixelV = nDetecV - r - 1,
    # output column c (axis 2) is pixelU = c; the pixel is uvOrigin + pixelU·deltaU + pixelV·deltaV.
    r = np.arange(nV, dtype=np.float64)
    c = np.arange(nU, dtype=np.float64)
    pixel_v = nV - r - 1.0
    # computeDeltas: detector-local coordinates of pixel (pixelU, pixelV) with the detector centred on
    # the origin ("P.x = 0"): y = dDetecU·(pixelU - nDetecU/2 + 0.5), z = dDetecV·(nDetecV/2 - 0.5 - pixelV).
    # (So with pixelV flipped, output row r sits at z = dV·(r - (nV-1)/2): row 0 is the lowest, -z.)
    local_y = dU * (c - nU / 2.0 + 0.5)                       # [U]
    local_z = dV * (nV / 2.0 - 0.5 - pixel_v)                 # [V]
    P = np.zeros((1, nV, nU, 3))
    P[..., 1] = local_y[None, None, :]
    P[..., 2] = local_z[None, :, None]
    # computeDeltas step 1: rollPitchYaw about the detector centre (still at the origin).
    P = np.einsum("aij,avuj->avui", _roll_pitch_yaw(f["rotDetector"]), np.broadcast_to(P, (len(DSO), nV, nU, 3)))
    # ... then move the detector to x = -(DSD - DSO) (behind the isocentre, source at +x).
    P = P + np.stack([-(DSD - DSO), 0 * DSO, 0 * DSO], -1)[:, None, None, :]
    # computeDeltas step 2: offDetector added in the un-rotated gantry frame: y += offDetecU, z += offDetecV.
    P = P + np.stack([0 * DSO, f["offDetector"][:, 1], f["offDetector"][:, 0]], -1)[:, None, None, :]
    # computeDeltas: the source starts at S = (DSO, 0, 0).
    S = np.stack([DSO, 0 * DSO, 0 * DSO], -1)
    # computeDeltas step 3: eulerZYZ rotates source and detector (the image never rotates).
    R = _euler_zyz(eul)
    P = np.einsum("aij,avuj->avui", R, P)
    S = np.einsum("aij,aj->ai", R, S)
    if frame == "world":
        shift = np.zeros_like(S)
    elif frame == "image":
        # computeDeltas "offset image": instead of moving the image by +offOrigin, subtract
        # (offOrigX, offOrigY, offOrigZ) = offOrigin[:, (2, 1, 0)] from source and detector ...
        # ... and add sVoxel/2 - dVoxel/2 so that the centre of the first voxel is (0, 0, 0)
        # (the texture is sampled at t + 0.5, the centre of texel t; Siddon adds sVoxel/2 and
        # puts voxel boundaries on integers instead, which is the same geometry).
        shift = -tigre_image_origin_in_world(geo, angles)
    else:
        raise ValueError(f"frame must be 'image' or 'world', got {frame!r}")
    P = P + shift[:, None, None, :]
    S = S + shift
    # computeDeltas step 4 divides by dVoxel (voxel units); we stay in mm.
    # computeDeltas step 5: COR shifts source and detector by COR·(-sin alpha, cos alpha, 0).
    cor = np.stack([-COR * np.sin(eul[:, 0]), COR * np.cos(eul[:, 0]), 0 * COR], -1)
    return S + cor, P + cor[:, None, None, :]


def tigre_voxel_centres(geo) -> np.ndarray:
    """``[Z, Y, X, 3]`` image-frame positions (mm, x y z) of the centres of voxels img[k, j, i]."""
    n, d, _ = _volume(geo)
    nx, ny, nz = (int(v) for v in n)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    return np.stack([i * d[0], j * d[1], k * d[2]], axis=-1).astype(np.float64)


# --------------------------------------------------------------------------- backprojector
def tigre_voxel_to_detector(geo, angles, ijk) -> np.ndarray:
    """Fractional (row, column) ``[A, N, 2]`` of TIGRE's projection array where voxel centres project.

    ``ijk`` ``[N, 3]``: voxel indices (i, j, k) of ``img[k, j, i]`` (may be fractional). This follows the
    FDK backprojector (voxel_backprojection.cu), a reading independent of ``tigre_rays``.
    """
    f = _fields(geo, angles)
    eul, DSO, DSD, COR = f["eul"], f["DSO"], f["DSD"], f["COR"]
    nV, nU = (int(x) for x in np.asarray(geo.nDetector).reshape(-1))
    dV, dU = (float(x) for x in np.asarray(geo.dDetector, dtype=np.float64).reshape(-1))
    n, d, s = _volume(geo)
    ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
    offV, offU = f["offDetector"][:, 0], f["offDetector"][:, 1]
    # computeDeltasCube: voxel (indX, indY, indZ) sits at -(sVoxel/2 - dVoxel/2) + offOrig + ind·dVoxel (world mm).
    P = (-(s - d) / 2.0)[None, None, :] + f["offOrigin"][:, None, ::-1] + (ijk * d)[None, :, :]   # [A, N, 3]
    # voxel_backprojection: the angles are negated (alpha = -angle, theta = -., psi = -.) and eulerZYZT
    # (alpha and psi swapped in the formula) rotates the *image*: that is the inverse of eulerZYZ above.
    Rt = np.swapaxes(_euler_zyz(eul), -1, -2)
    P = np.einsum("aij,anj->ani", Rt, P)
    # computeDeltasCube "detector offset": y -= offDetecU, z -= offDetecV.
    P = P - np.stack([0 * offU, offU, offV], -1)[:, None, :]
    # computeDeltasCube: x += DSD - DSO (detector centre to the origin), rollPitchYawT (the transpose of
    # rollPitchYaw), x -= DSD - DSO.
    Qt = np.swapaxes(_roll_pitch_yaw(f["rotDetector"]), -1, -2)
    to_det = np.stack([DSD - DSO, 0 * DSO, 0 * DSO], -1)
    P = np.einsum("aij,anj->ani", Qt, P + to_det[:, None, :]) - to_det[:, None, :]
    # computeDeltasCube: the source, detector-centred, is (DSD, -offDetecU, -offDetecV), rotated by
    # rollPitchYawT, then x -= DSD - DSO.
    S = np.einsum("aij,aj->ai", Qt, np.stack([DSD, -offU, -offV], -1)) - to_det
    # kernelPixelBackprojectionFDK: the voxel's y is shifted by -COR (detector units there; mm here).
    P = P - np.stack([0 * COR, COR, 0 * COR], -1)[:, None, :]
    # kernel: intersect source -> voxel with the detector plane x = DSO - DSD.
    vec = P - S[:, None, :]
    t = ((DSO - DSD) - S[:, 0])[:, None] / vec[..., 0]
    y = vec[..., 1] * t + S[:, None, 1]
    z = vec[..., 2] * t + S[:, None, 2]
    # kernel: u = y/dDetecU + nDetecU/2, v = z/dDetecV + nDetecV/2 are texture coordinates of the
    # projection array (CreateTexture, Python build: extent (nDetecU, nDetecV, nangles), i.e. [A, V, U]
    # with U fastest); texel t has its centre at t + 0.5, so the array indices are u - 0.5 and v - 0.5.
    col = y / dU + nU / 2.0 - 0.5
    row = z / dV + nV / 2.0 - 0.5
    return np.stack([row, col], axis=-1)


def tigre_check_geo(geo) -> None:
    """The mandatory-field checks of geometry.py ``check_geo`` (AttributeError, as TIGRE raises)."""
    for name in ("nVoxel", "sVoxel", "dVoxel", "nDetector", "sDetector", "dDetector", "DSO", "DSD"):
        if not hasattr(geo, name):                                   # check_geo: mandatory_attribs
            raise AttributeError(f"geo lacks mandatory field {name}")
    for name, shape in (("nVoxel", (3,)), ("sVoxel", (3,)), ("dVoxel", (3,)),
                        ("nDetector", (2,)), ("sDetector", (2,)), ("dDetector", (2,))):
        if np.shape(getattr(geo, name)) != shape:                    # check_geo: geo.X.shape should be ...
            raise AttributeError(f"geo.{name}.shape should be {shape}")
    for n, d, s in (("nVoxel", "dVoxel", "sVoxel"), ("nDetector", "dDetector", "sDetector")):
        if not np.sum(np.abs(np.asarray(getattr(geo, d)) * np.asarray(getattr(geo, n))
                             - np.asarray(getattr(geo, s)))) < 1e-6:  # check_geo: n*d must equal s
            raise AttributeError(f"{n}*{d} is not equal to {s}")
    for name in ("DSO", "DSD"):                                      # __check_and_repmat__: accepted types
        value = getattr(geo, name)
        if not (type(value) in (float, int, np.float32, np.float64, np.int32) or isinstance(value, np.ndarray)):
            raise TypeError(f"Data type not understood for: geo.{name}")
