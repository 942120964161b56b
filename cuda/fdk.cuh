// FDK voxel-driven backprojection: per-voxel arithmetic shared by the kernel and the CPU emulation. It
// reproduces ctrecon.operators.fdk.backproject (whose docstring is the contract), all in float32: for voxel centre
// (x, y, z) and view a (cos θ, sin θ rounded to float32)
//     L = DSO - (x·cos θ + y·sin θ)      t = -x·sin θ + y·cos θ      m = DSD / L
//     c = clamp((m·t - ou)/du + (U-1)/2, -1, U)     r = clamp((m·z - ov)/dv + (V-1)/2, -1, V)
//     f += w_a · (DSO / L)² · bilinear(filtered[a], r, c)      (pixels outside the detector read 0)
// with torch.lerp's interpolation formula. The view geometry uses correctly rounded operations, so it
// rounds like the reference's one-operation-per-tensor arithmetic.
#pragma once

#include "common.cuh"

namespace ctrecon {

// Scan geometry as the reference's float32 arithmetic sees it.
struct FdkDetector {
  int64_t n_rows, n_cols;
  float dso, dsd;       // source-isocentre and source-detector distances, mm
  float du, dv;         // detector pixel size (columns, rows), mm
  float ou, ov;         // detector offset (columns, rows), mm
  float half_rows, half_cols;  // (V - 1) / 2, (U - 1) / 2
};

CTRECON_HD FdkDetector make_fdk_detector(int64_t n_rows, int64_t n_cols, const double* scan) {
  // scan = (DSO, DSD, du, dv, ou, ov)
  return FdkDetector{n_rows,
                     n_cols,
                     static_cast<float>(scan[0]),
                     static_cast<float>(scan[1]),
                     static_cast<float>(scan[2]),
                     static_cast<float>(scan[3]),
                     static_cast<float>(scan[4]),
                     static_cast<float>(scan[5]),
                     static_cast<float>((n_rows - 1) / 2.0),
                     static_cast<float>((n_cols - 1) / 2.0)};
}

// Pixel (r, c) of one view [V, U], zero outside the detector.
CTRECON_HD float detector_pixel(const float* view, const FdkDetector& det, int64_t r, int64_t c) {
  return (r >= 0 && r < det.n_rows && c >= 0 && c < det.n_cols) ? read_only(view + r * det.n_cols + c) : 0.0f;
}

// Adds view `view` (cos θ, sin θ, quadrature weight w) to the voxels (x, y, zs[k]), k < count, of acc[].
template <int kMaxCount>
CTRECON_HD void fdk_add_view(const float* view, const FdkDetector& det, float cos_t, float sin_t, float w, float x,
                             float y, const float* zs, int count, float* acc) {
  const float distance = sub_rn(det.dso, add_rn(mul_rn(x, cos_t), mul_rn(y, sin_t)));
  const float along_u = add_rn(mul_rn(-x, sin_t), mul_rn(y, cos_t));
  const float magnification = det.dsd / distance;
  const float ratio = det.dso / distance;
  const float weight = mul_rn(mul_rn(ratio, ratio), w);
  float column = add_rn(sub_rn(mul_rn(magnification, along_u), det.ou) / det.du, det.half_cols);
  column = min_of(max_of(column, -1.0f), static_cast<float>(det.n_cols));
  const float column_floor = floorf(column);
  const float fc = column - column_floor;
  const int64_t c0 = static_cast<int64_t>(column_floor);
CTRECON_UNROLL
  for (int k = 0; k < kMaxCount; ++k) {
    if (k < count) {
      float row = add_rn(sub_rn(mul_rn(magnification, zs[k]), det.ov) / det.dv, det.half_rows);
      row = min_of(max_of(row, -1.0f), static_cast<float>(det.n_rows));
      const float row_floor = floorf(row);
      const float fr = row - row_floor;
      const int64_t r0 = static_cast<int64_t>(row_floor);
      const float top = lerp(detector_pixel(view, det, r0, c0), detector_pixel(view, det, r0, c0 + 1), fc);
      const float bottom = lerp(detector_pixel(view, det, r0 + 1, c0), detector_pixel(view, det, r0 + 1, c0 + 1), fc);
      acc[k] += lerp(top, bottom, fr) * weight;
    }
  }
}

// Voxels (i, j, k0 … k0 + kColumn - 1) of the volume [Z, Y, X] (those with k < nz): the sum over all views,
// written once. filtered [A, V, U]; xs, ys, zs voxel-centre coordinates; cos, sin, weights per view.
template <int kColumn>
CTRECON_HD void fdk_column(const float* filtered, int64_t n_views, const FdkDetector& det, const float* xs,
                           int64_t nx, const float* ys, int64_t ny, const float* zs, int64_t nz,
                           const float* cos_theta, const float* sin_theta, const float* weights, int64_t i, int64_t j,
                           int64_t k0, float* out) {
  const int count = static_cast<int>(min_of<int64_t>(kColumn, nz - k0));
  float z[kColumn];
  float acc[kColumn];
  CTRECON_UNROLL
  for (int k = 0; k < kColumn; ++k) {
    z[k] = k < count ? zs[k0 + k] : 0.0f;
    acc[k] = 0.0f;
  }
  const float x = xs[i], y = ys[j];
  const int64_t view_size = det.n_rows * det.n_cols;
  for (int64_t a = 0; a < n_views; ++a) {
    fdk_add_view<kColumn>(filtered + a * view_size, det, cos_theta[a], sin_theta[a], weights[a], x, y, z, count, acc);
  }
  CTRECON_UNROLL
  for (int k = 0; k < kColumn; ++k) {
    if (k < count) out[((k0 + k) * ny + j) * nx + i] = acc[k];
  }
}

}  // namespace ctrecon
