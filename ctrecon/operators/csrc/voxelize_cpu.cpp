// Gaussian voxelizer, CPU (OpenMP): the compiled twin of the PyTorch reference in
// ctrecon/operators/voxelize.py, whose docstring defines the semantics (q order, q <= k^2 inclusive,
// voxel centres from float64 tables rounded to the working dtype, boxes computed by the caller). q is
// evaluated by the same code as the CUDA kernels (row_linear_term, row_constant_term, row_mahalanobis of
// cuda/voxelize.cuh, included here as host code).
//
// Inputs must be sorted by box start (lo_z, lo_y, lo_x) within each batch item (ctrecon/operators/voxelize.py
// does it): the forward finds each slice's Gaussians by binary search, and neighbouring Gaussians touch
// neighbouring memory (the backward is bound by cache misses on the upstream gradient otherwise).
// forward : out[b, z, y, x] = sum_g I_g exp(-q/2) [q <= k2], parallel over (b, z) slices, each slice
//           owned by one thread (no atomics, deterministic Gaussian order).
// backward: per-Gaussian sums over its box, parallel over Gaussians (no atomics); accumulates in double.
// Rows outside the ellipsoid are skipped with the analytic x-interval of the quadratic q(dx), widened by
// one voxel on each side; the exact q <= k2 test then decides each voxel exactly as the reference does.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "voxelize.cuh"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

struct Grid {
  int64_t Z, Y, X;
  double x0, dx;  // x of voxel column 0 and the spacing: used only for the row interval
};

inline int64_t floor_index(double f) {
  const int64_t t = static_cast<int64_t>(f);
  return t - (static_cast<double>(t) > f);
}

inline int64_t ceil_index(double f) {
  const int64_t t = static_cast<int64_t>(f);
  return t + (static_cast<double>(t) < f);
}

// Row (y, z) of a Gaussian: the terms of q that are fixed along the row (q = row_mahalanobis(Pxx, dx, linear,
// constant)) and the inclusive column range [i0, i1] that may hold q <= k2 (i0 > i1 if none).
template <typename scalar_t>
struct Row {
  scalar_t linear, constant;
  int64_t i0, i1;
};

template <typename scalar_t>
inline Row<scalar_t> row_of(const scalar_t* p, scalar_t dy, scalar_t dz, double k2, double mx, const Grid& g,
                            int64_t lo, int64_t hi) {
  Row<scalar_t> row{ctrecon::row_linear_term(p, dy, dz), ctrecon::row_constant_term(p, dy, dz), 1, 0};
  const double a = static_cast<double>(p[0]), bb = static_cast<double>(row.linear);
  const double cc = static_cast<double>(row.constant);
  const double min_q = cc - bb * bb / a;  // minimum of q over the row (continuous dx)
  if (!(min_q <= k2 * (1.0 + 1e-4) + 1e-12)) return row;
  const double half = std::sqrt(std::max(0.0, (k2 - min_q) / a));
  const double centre = mx - bb / a;
  const double f0 = (centre - half - g.x0) / g.dx, f1 = (centre + half - g.x0) / g.dx;
  // Clamped to the grid (plus margin) so that the integer casts are exact floor/ceil; widened by one
  // voxel each side against rounding.
  const double lim = static_cast<double>(g.X) + 2.0;
  row.i0 = std::max<int64_t>(lo, ceil_index(std::max(-lim, std::min(lim, f0))) - 1);
  row.i1 = std::min<int64_t>(hi, floor_index(std::max(-lim, std::min(lim, f1))) + 1);
  return row;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* means, const scalar_t* prec, const scalar_t* intens, const int64_t* lo,
                    const int64_t* hi, const scalar_t* xs, const scalar_t* ys, const scalar_t* zs, int64_t B,
                    int64_t N, const Grid grid, double k2, scalar_t* out) {
  const scalar_t k2s = static_cast<scalar_t>(k2);
  // Gaussians come sorted by box start (lo_z, lo_y, lo_x) within each item: a slice only scans the
  // window lo_z in [z - depth, z], found by binary search.
  std::vector<int64_t> depth(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t gi = b * N + n;
      depth[b] = std::max(depth[b], hi[3 * gi + 2] - lo[3 * gi + 2]);
    }
  auto first_with_lo_z = [&](int64_t b, int64_t z) {  // first n of item b with lo_z >= z
    int64_t a = 0, e = N;
    while (a < e) {
      const int64_t mid = (a + e) / 2;
      if (lo[3 * (b * N + mid) + 2] < z) a = mid + 1; else e = mid;
    }
    return a;
  };
  const int64_t tasks = B * grid.Z;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / grid.Z, z = task % grid.Z;
    scalar_t* slice = out + task * grid.Y * grid.X;
    const int64_t n_end = first_with_lo_z(b, z + 1);
    for (int64_t n = first_with_lo_z(b, z - depth[b]); n < n_end; ++n) {
      const int64_t gi = b * N + n;
      const int64_t* l = lo + 3 * gi;
      const int64_t* h = hi + 3 * gi;
      if (z > h[2] || l[0] > h[0] || l[1] > h[1]) continue;
      const scalar_t mx = means[3 * gi], my = means[3 * gi + 1], mz = means[3 * gi + 2];
      const scalar_t* p = prec + 6 * gi;
      const scalar_t pxx = p[0], inten = intens[gi];
      const scalar_t dz = zs[z] - mz;
      for (int64_t y = l[1]; y <= h[1]; ++y) {
        const Row<scalar_t> r = row_of(p, ys[y] - my, dz, k2, static_cast<double>(mx), grid, l[0], h[0]);
        scalar_t* row = slice + y * grid.X;
        for (int64_t i = r.i0; i <= r.i1; ++i) {
          const scalar_t q = ctrecon::row_mahalanobis(pxx, xs[i] - mx, r.linear, r.constant);
          if (q <= k2s) row[i] += inten * std::exp(scalar_t(-0.5) * q);
        }
      }
    }
  }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* means, const scalar_t* prec, const scalar_t* intens,
                     const int64_t* lo, const int64_t* hi, const scalar_t* xs, const scalar_t* ys,
                     const scalar_t* zs, int64_t B, int64_t N, const Grid grid, double k2, scalar_t* grad_means,
                     scalar_t* grad_prec, scalar_t* grad_intens) {
  const scalar_t k2s = static_cast<scalar_t>(k2);
  const int64_t G = B * N;
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t b = gi / N;
    const int64_t* l = lo + 3 * gi;
    const int64_t* h = hi + 3 * gi;
    double acc_i = 0, acc_m[3] = {0, 0, 0}, acc_p[6] = {0, 0, 0, 0, 0, 0};
    const scalar_t mx = means[3 * gi], my = means[3 * gi + 1], mz = means[3 * gi + 2];
    const scalar_t* p = prec + 6 * gi;
    const scalar_t pxx = p[0], pxy = p[1], pxz = p[2], pyy = p[3], pyz = p[4], pzz = p[5];
    const scalar_t* item = grad_out + b * grid.Z * grid.Y * grid.X;
    if (l[0] <= h[0] && l[1] <= h[1]) {
      for (int64_t z = l[2]; z <= h[2]; ++z) {
        const scalar_t dz = zs[z] - mz;
        for (int64_t y = l[1]; y <= h[1]; ++y) {
          const scalar_t dy = ys[y] - my;
          const Row<scalar_t> r = row_of(p, dy, dz, k2, static_cast<double>(mx), grid, l[0], h[0]);
          const scalar_t* row = item + (z * grid.Y + y) * grid.X;
          // Row sums of w, w·dx, w·dx² (w = upstream gradient × exp) give every accumulator; rows are
          // short, so they are summed in the working dtype and the totals in double.
          scalar_t r0 = 0, r1 = 0, r2 = 0;
          for (int64_t i = r.i0; i <= r.i1; ++i) {
            const scalar_t dx = xs[i] - mx;
            const scalar_t q = ctrecon::row_mahalanobis(pxx, dx, r.linear, r.constant);
            if (q <= k2s) {
              const scalar_t w = row[i] * std::exp(scalar_t(-0.5) * q);
              r0 += w;
              r1 += w * dx;
              r2 += w * dx * dx;
            }
          }
          if (r0 == 0 && r1 == 0) continue;
          const double s0 = r0, s1 = r1, s2 = r2;
          const double dyd = dy, dzd = dz;
          acc_i += s0;
          // grad wrt mu = I Σ w P d; d = (dx, dy, dz)
          acc_m[0] += pxx * s1 + (pxy * dyd + pxz * dzd) * s0;
          acc_m[1] += pxy * s1 + (pyy * dyd + pyz * dzd) * s0;
          acc_m[2] += pxz * s1 + (pyz * dyd + pzz * dzd) * s0;
          // grad wrt precision entries = -I/2 Σ w (dx², 2dxdy, 2dxdz, dy², 2dydz, dz²)
          acc_p[0] += s2;
          acc_p[1] += 2 * dyd * s1;
          acc_p[2] += 2 * dzd * s1;
          acc_p[3] += dyd * dyd * s0;
          acc_p[4] += 2 * dyd * dzd * s0;
          acc_p[5] += dzd * dzd * s0;
        }
      }
    }
    const double inten = intens[gi];
    if (grad_intens) grad_intens[gi] = static_cast<scalar_t>(acc_i);
    if (grad_means)
      for (int c = 0; c < 3; ++c) grad_means[3 * gi + c] = static_cast<scalar_t>(inten * acc_m[c]);
    if (grad_prec)
      for (int c = 0; c < 6; ++c) grad_prec[6 * gi + c] = static_cast<scalar_t>(-0.5 * inten * acc_p[c]);
  }
}

Grid make_grid(const torch::Tensor& xs, const torch::Tensor& ys, const torch::Tensor& zs, double x0, double dx) {
  return Grid{zs.size(0), ys.size(0), xs.size(0), x0, dx};
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

torch::Tensor voxelize_forward(torch::Tensor means, torch::Tensor prec, torch::Tensor intens, torch::Tensor lo,
                               torch::Tensor hi, torch::Tensor xs, torch::Tensor ys, torch::Tensor zs, int64_t B,
                               double x0, double dx, double k2) {
  for (auto* t : {&means, &prec, &intens, &lo, &hi, &xs, &ys, &zs}) check(*t, "input");
  const int64_t G = means.size(0);
  TORCH_CHECK(B > 0 && G % B == 0, "Gaussian count must be a multiple of the batch size");
  const Grid grid = make_grid(xs, ys, zs, x0, dx);
  auto out = torch::zeros({B, grid.Z, grid.Y, grid.X}, means.options());
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "voxelize_forward", [&] {
    forward_kernel<scalar_t>(means.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(), intens.data_ptr<scalar_t>(),
                             lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(), xs.data_ptr<scalar_t>(),
                             ys.data_ptr<scalar_t>(), zs.data_ptr<scalar_t>(), B, G / B, grid, k2,
                             out.data_ptr<scalar_t>());
  });
  return out;
}

std::vector<torch::Tensor> voxelize_backward(torch::Tensor grad_out, torch::Tensor means, torch::Tensor prec,
                                             torch::Tensor intens, torch::Tensor lo, torch::Tensor hi,
                                             torch::Tensor xs, torch::Tensor ys, torch::Tensor zs, int64_t B,
                                             double x0, double dx, double k2) {
  for (auto* t : {&grad_out, &means, &prec, &intens, &lo, &hi, &xs, &ys, &zs}) check(*t, "input");
  const int64_t G = means.size(0);
  TORCH_CHECK(B > 0 && G % B == 0, "Gaussian count must be a multiple of the batch size");
  const Grid grid = make_grid(xs, ys, zs, x0, dx);
  auto grad_means = torch::empty_like(means);
  auto grad_prec = torch::empty_like(prec);
  auto grad_intens = torch::empty_like(intens);
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "voxelize_backward", [&] {
    backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(), prec.data_ptr<scalar_t>(),
                              intens.data_ptr<scalar_t>(), lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(),
                              xs.data_ptr<scalar_t>(), ys.data_ptr<scalar_t>(), zs.data_ptr<scalar_t>(), B, G / B,
                              grid, k2, grad_means.data_ptr<scalar_t>(), grad_prec.data_ptr<scalar_t>(),
                              grad_intens.data_ptr<scalar_t>());
  });
  return {grad_means, grad_prec, grad_intens};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &voxelize_forward, "Gaussian voxelizer forward (CPU)");
  m.def("backward", &voxelize_backward, "Gaussian voxelizer backward (CPU)");
}
