// Serial CPU emulation of the ctrecon CUDA kernels, for tests/test_cuda.py on machines without a GPU.
//
// It runs the kernels' per-thread code (the CTRECON_HD functions of cuda/*.cuh, compiled here as plain C++
// with -ffp-contract=off) over every (block, thread) of each launch, one thread at a time, with atomics
// as plain additions. What it does not cover is the block-level orchestration of the .cu files (launch
// geometry, shared-memory staging, barriers, warp reductions), which only a GPU run checks.
//
// The functions mirror the binding of cuda/ext.cpp (same names and argument order, raw pointers and sizes
// instead of tensors, no stream), so that the operators' CUDA glue (ctrecon/operators/) runs unchanged over them.
#include <cstdint>
#include <cstring>

#include "fdk.cuh"
#include "projector.cuh"
#include "voxelize.cuh"

using namespace ctrecon;

namespace {

// Mirrors kVoxelsPerThread of cuda/fdk.cu (the column length changes no result, only the work split).
constexpr int kFdkColumn = 8;

Lattice lattice_of(const int64_t* spec) {
  const int32_t n[3] = {static_cast<int32_t>(spec[0]), static_cast<int32_t>(spec[1]), static_cast<int32_t>(spec[2])};
  const int32_t tile[3] = {static_cast<int32_t>(spec[3]), static_cast<int32_t>(spec[4]),
                           static_cast<int32_t>(spec[5])};
  return make_lattice(n, tile, spec[6]);
}

// Every site of a launch of voxelize.cu, in block (tile key, chunk) and thread order: body(site, out_index,
// first, last) with the tile's Gaussian list lists.ids[first .. last); keys with an empty list are skipped.
template <class Sites, class Body>
void for_each_site(const TileLists& lists, const Sites& sites, int64_t n_keys, const Body& body) {
  for (int64_t key = 0; key < n_keys; ++key) {
    const int64_t first = list_begin(lists.ends, key), last = lists.ends[key];
    if (first == last) continue;
    for (int64_t chunk = 0; chunk < site_chunks(sites, key); ++chunk) {
      for (int thread = 0; thread < kVoxelizeBlock; ++thread) {
        Site site;
        int64_t out_index = 0;
        if (site_of(sites, key, chunk, thread, site, out_index)) body(site, out_index, first, last);
      }
    }
  }
}

// The forward_kernel of voxelize.cu without the shared-memory staging: each site sums its tile's list in order.
template <class Sites>
void render(const Gaussians& gaussians, const TileLists& lists, const Sites& sites, int64_t n_keys, float k2,
            float* out, int64_t n_out) {
  std::memset(out, 0, sizeof(float) * n_out);
  for_each_site(lists, sites, n_keys, [&](const Site& site, int64_t out_index, int64_t first, int64_t last) {
    float value = 0.0f;
    for (int64_t n = first; n < last; ++n) value += gaussian_value(load_gaussian(gaussians, lists.ids[n]), site, k2);
    out[out_index] = value;
  });
}

// The backward_kernel of voxelize.cu with its reductions done as serial sums.
template <class Sites>
void moments_of(const Gaussians& gaussians, const TileLists& lists, const Sites& sites, int64_t n_keys, float k2,
                const float* grad_out, float* moments, int64_t n_gaussians) {
  std::memset(moments, 0, sizeof(float) * kMoments * n_gaussians);
  for_each_site(lists, sites, n_keys, [&](const Site& site, int64_t out_index, int64_t first, int64_t last) {
    const float grad = grad_out[out_index];
    if (grad == 0.0f) return;
    for (int64_t n = first; n < last; ++n) {
      float m[kMoments];
      if (!gaussian_moments(load_gaussian(gaussians, lists.ids[n]), site, k2, grad, m)) continue;
      for (int c = 0; c < kMoments; ++c) moments[static_cast<int64_t>(lists.ids[n]) * kMoments + c] += m[c];
    }
  });
}

Gaussians gaussians_of(const float* means, const float* prec, const float* intensities, const int32_t* lo,
                       const int32_t* hi) {
  return Gaussians{means, prec, intensities, Boxes{lo, hi}};
}

}  // namespace

extern "C" {

void project_forward(const float* volume, int64_t nz, int64_t ny, int64_t nx, const double* views, int64_t n_views,
                     int64_t n_rows, int64_t n_cols, const double* spacing, float* out) {
  const ProjectorGrid grid{{nx, ny, nz}, {spacing[0], spacing[1], spacing[2]}};
  for (int64_t a = 0; a < n_views; ++a)
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t c = 0; c < n_cols; ++c) {
        Ray ray;
        const bool hits = setup_ray(views + a * kViewFields, r, c, grid, ray);
        out[(a * n_rows + r) * n_cols + c] = hits ? ray_integral(volume, ray) : 0.0f;
      }
}

void project_adjoint(const float* projections, int64_t n_views, int64_t n_rows, int64_t n_cols, const double* views,
                     const double* spacing, int64_t nz, int64_t ny, int64_t nx, float* out) {
  const ProjectorGrid grid{{nx, ny, nz}, {spacing[0], spacing[1], spacing[2]}};
  std::memset(out, 0, sizeof(float) * nz * ny * nx);
  for (int64_t a = 0; a < n_views; ++a)
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t c = 0; c < n_cols; ++c) {
        const float value = projections[(a * n_rows + r) * n_cols + c];
        Ray ray;
        if (value != 0.0f && setup_ray(views + a * kViewFields, r, c, grid, ray)) ray_scatter(out, ray, value);
      }
}

void fdk_backproject(const float* filtered, int64_t n_views, int64_t n_rows, int64_t n_cols, const float* xs,
                     int64_t nx, const float* ys, int64_t ny, const float* zs, int64_t nz, const float* cos_theta,
                     const float* sin_theta, const float* weights, const double* scan, float* out) {
  const FdkDetector det = make_fdk_detector(n_rows, n_cols, scan);
  for (int64_t k0 = 0; k0 < nz; k0 += kFdkColumn)
    for (int64_t j = 0; j < ny; ++j)
      for (int64_t i = 0; i < nx; ++i)
        fdk_column<kFdkColumn>(filtered, n_views, det, xs, nx, ys, ny, zs, nz, cos_theta, sin_theta, weights, i, j,
                               k0, out);
}

void tile_counts(const int32_t* lo, const int32_t* hi, int64_t n_gaussians, const int64_t* lattice, int64_t* counts) {
  const Lattice L = lattice_of(lattice);
  for (int64_t g = 0; g < n_gaussians; ++g) counts[g] = tile_count(Boxes{lo, hi}, g, L);
}

void tile_pairs(const int32_t* lo, const int32_t* hi, const int64_t* ends, int64_t n_gaussians, int64_t n_pairs,
                const int64_t* lattice, int32_t* keys, int32_t* ids) {
  const Lattice L = lattice_of(lattice);
  for (int64_t pair = 0; pair < n_pairs; ++pair) {
    int64_t gaussian;
    keys[pair] = static_cast<int32_t>(pair_tile_key(Boxes{lo, hi}, ends, n_gaussians, pair, L, gaussian));
    ids[pair] = static_cast<int32_t>(gaussian);
  }
}

void point_tile_keys(const int32_t* cells, int64_t n_points, int64_t points_per_item, const int64_t* lattice,
                     int32_t* keys) {
  const Lattice L = lattice_of(lattice);
  for (int64_t row = 0; row < n_points; ++row)
    keys[row] = static_cast<int32_t>(cell_tile_key(row / points_per_item, cells + 3 * row, L));
}

void dense_forward(const float* means, const float* prec, const float* intensities, const int32_t* lo,
                   const int32_t* hi, const int32_t* ids, const int64_t* tile_ends, int64_t n_keys,
                   const int64_t* lattice, const float* xs, const float* ys, const float* zs, float k2, float* out,
                   int64_t n_out) {
  const DenseSites sites{lattice_of(lattice), xs, ys, zs};
  render(gaussians_of(means, prec, intensities, lo, hi), TileLists{ids, tile_ends}, sites, n_keys, k2, out, n_out);
}

void dense_backward(const float* means, const float* prec, const float* intensities, const int32_t* lo,
                    const int32_t* hi, const int32_t* ids, const int64_t* tile_ends, int64_t n_keys,
                    const int64_t* lattice, const float* xs, const float* ys, const float* zs, float k2,
                    const float* grad_out, float* moments, int64_t n_gaussians) {
  const DenseSites sites{lattice_of(lattice), xs, ys, zs};
  moments_of(gaussians_of(means, prec, intensities, lo, hi), TileLists{ids, tile_ends}, sites, n_keys, k2, grad_out,
             moments, n_gaussians);
}

void points_forward(const float* means, const float* prec, const float* intensities, const int32_t* lo,
                    const int32_t* hi, const int32_t* ids, const int64_t* tile_ends, int64_t n_keys,
                    const int64_t* lattice, const float* points, const int32_t* cells, const int64_t* order,
                    const int64_t* point_ends, float k2, float* out, int64_t n_out) {
  const PointSites sites{lattice_of(lattice), points, cells, order, point_ends};
  render(gaussians_of(means, prec, intensities, lo, hi), TileLists{ids, tile_ends}, sites, n_keys, k2, out, n_out);
}

void points_backward(const float* means, const float* prec, const float* intensities, const int32_t* lo,
                     const int32_t* hi, const int32_t* ids, const int64_t* tile_ends, int64_t n_keys,
                     const int64_t* lattice, const float* points, const int32_t* cells, const int64_t* order,
                     const int64_t* point_ends, float k2, const float* grad_out, float* moments,
                     int64_t n_gaussians) {
  const PointSites sites{lattice_of(lattice), points, cells, order, point_ends};
  moments_of(gaussians_of(means, prec, intensities, lo, hi), TileLists{ids, tile_ends}, sites, n_keys, k2, grad_out,
             moments, n_gaussians);
}

}  // extern "C"
