// FDK voxel-driven backprojection on the GPU (the per-voxel arithmetic is in fdk.cuh). One thread owns a
// column of kVoxelsPerThread voxels along z at one (x, y): the view geometry (distance weight,
// magnification, detector column) is computed once per view for the whole column, and the sums stay in
// registers, so every voxel is written once (no atomics, deterministic). Threads of a block cover a 32×8
// patch of (x, y), so a warp reads neighbouring detector columns.
#include <cuda_runtime.h>

#include "fdk.cuh"
#include "kernels.h"

namespace ctrecon {
namespace {

constexpr int kBlockX = 32, kBlockY = 8;
constexpr int kVoxelsPerThread = 8;

__global__ void __launch_bounds__(kBlockX* kBlockY)
    backproject_kernel(const float* __restrict__ filtered, int64_t n_views, FdkDetector det,
                       const float* __restrict__ xs, int64_t nx, const float* __restrict__ ys, int64_t ny,
                       const float* __restrict__ zs, int64_t nz, const float* __restrict__ cos_theta,
                       const float* __restrict__ sin_theta, const float* __restrict__ weights,
                       float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlockX + threadIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kBlockY + threadIdx.y;
  if (i >= nx || j >= ny) return;
  fdk_column<kVoxelsPerThread>(filtered, n_views, det, xs, nx, ys, ny, zs, nz, cos_theta, sin_theta, weights, i, j,
                               static_cast<int64_t>(blockIdx.z) * kVoxelsPerThread, out);
}

}  // namespace

namespace cuda {

int fdk_backproject(const float* filtered, int64_t n_views, int64_t n_rows, int64_t n_cols, const float* xs,
                    int64_t nx, const float* ys, int64_t ny, const float* zs, int64_t nz, const float* cos_theta,
                    const float* sin_theta, const float* weights, const double* scan, float* out, void* stream) {
  if (nx == 0 || ny == 0 || nz == 0) return 0;
  const FdkDetector det = make_fdk_detector(n_rows, n_cols, scan);
  const dim3 block(kBlockX, kBlockY);
  const dim3 blocks(static_cast<unsigned>((nx + kBlockX - 1) / kBlockX),
                    static_cast<unsigned>((ny + kBlockY - 1) / kBlockY),
                    static_cast<unsigned>((nz + kVoxelsPerThread - 1) / kVoxelsPerThread));
  backproject_kernel<<<blocks, block, 0, static_cast<cudaStream_t>(stream)>>>(
      filtered, n_views, det, xs, nx, ys, ny, zs, nz, cos_theta, sin_theta, weights, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace ctrecon
