// Host API of the ctrecon CUDA kernels: plain C++ (no torch, no CUDA headers), implemented in cuda/*.cu
// and called by the torch binding cuda/ext.cpp. Every pointer is a device pointer to contiguous data;
// `stream` is a cudaStream_t passed as void*. Every function only enqueues work on that stream and
// returns a CUDA error code (0 = success; error_string() describes the others).
#pragma once

#include <cstdint>

#include "voxelize.cuh"

namespace ctrecon {
namespace cuda {

const char* error_string(int code);

// ---- projector (cuda/projector.cu): float32 volumes [Z, Y, X], projections [A, V, U], views [A, 12]
// float64 as in ctrecon.operators.projector.view_table, spacing (dx, dy, dz) mm.
int project_forward(const float* volume, int64_t nz, int64_t ny, int64_t nx, const double* views, int64_t n_views,
                    int64_t n_rows, int64_t n_cols, const double* spacing_xyz, float* out, void* stream);
// `out` [Z, Y, X] is overwritten (zeroed, then accumulated with atomics).
int project_adjoint(const float* projections, int64_t n_views, int64_t n_rows, int64_t n_cols, const double* views,
                    const double* spacing_xyz, int64_t nz, int64_t ny, int64_t nx, float* out, void* stream);

// ---- FDK voxel-driven backprojection (cuda/fdk.cu), see cuda/fdk.cuh.
// filtered [A, V, U]; xs [X], ys [Y], zs [Z] voxel-centre coordinates (mm); cos, sin, weights [A];
// scan = (DSO, DSD, du, dv, ou, ov) (host memory, 6 doubles); out [Z, Y, X] is overwritten.
int fdk_backproject(const float* filtered, int64_t n_views, int64_t n_rows, int64_t n_cols, const float* xs,
                    int64_t nx, const float* ys, int64_t ny, const float* zs, int64_t nz, const float* cos_theta,
                    const float* sin_theta, const float* weights, const double* scan, float* out, void* stream);

// ---- Gaussian voxelizer (cuda/voxelize.cu), see cuda/voxelize.cuh.
// counts[g] = number of tiles that Gaussian g's box touches.
int gaussian_tile_counts(Boxes boxes, int64_t n_gaussians, Lattice lattice, int64_t* counts, void* stream);
// Pair p < n_pairs (ends = inclusive prefix sums of counts) -> keys[p] = item·tiles_per_item + tile, ids[p] = g.
int gaussian_tile_pairs(Boxes boxes, const int64_t* ends, int64_t n_gaussians, int64_t n_pairs, Lattice lattice,
                        int32_t* keys, int32_t* ids, void* stream);
// keys[row] = tile key of query point `row` (lattice cell cells[row], batch item row / points_per_item).
int point_tile_keys(const int32_t* cells, int64_t n_points, int64_t points_per_item, Lattice lattice, int32_t* keys,
                    void* stream);
// Renders into `out` (n_out values, zeroed here): dense [B, Z, Y, X], points [B·M]. n_keys = B·tiles_per_item.
int voxelize_dense_forward(Gaussians gaussians, TileLists lists, DenseSites sites, int64_t n_keys, float k2,
                           float* out, int64_t n_out, void* stream);
int voxelize_points_forward(Gaussians gaussians, TileLists lists, PointSites sites, int64_t n_keys, float k2,
                            float* out, int64_t n_out, void* stream);
// moments [G, 10] (zeroed here) receive Σ w·(1, dx, dy, dz, dx², dxdy, dxdz, dy², dydz, dz²) per Gaussian
// over its included sites, w = grad_out · exp(-q/2).
int voxelize_dense_backward(Gaussians gaussians, TileLists lists, DenseSites sites, int64_t n_keys, float k2,
                            const float* grad_out, float* moments, int64_t n_gaussians, void* stream);
int voxelize_points_backward(Gaussians gaussians, TileLists lists, PointSites sites, int64_t n_keys, float k2,
                             const float* grad_out, float* moments, int64_t n_gaussians, void* stream);

}  // namespace cuda
}  // namespace ctrecon
