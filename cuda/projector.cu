// Joseph cone-beam projector on the GPU: forward (one thread per ray, gathers) and its exact adjoint (one
// thread per ray, the same samples scattered with atomicAdd). The per-ray arithmetic lives in
// projector.cuh; this file holds the kernels and their launchers.
//
// Volume reads go through the read-only data path (__ldg) with an explicit zero-border predicate: the
// equivalent of a border-addressed, point-sampled 3-D texture (hardware linear filtering is not used: its
// 8-bit fixed-point weights would not reproduce the float reference), without the per-call copy of the
// volume into a CUDA array. Threads of a 16×16 block cover a 16×16 patch of detector pixels of one view,
// so a warp's rays (16 columns × 2 rows) are neighbours and read neighbouring voxels; all views of a call
// run in one launch (grid z = view).
#include <cuda_runtime.h>

#include "kernels.h"
#include "projector.cuh"

namespace ctrecon {
namespace {

constexpr int kTile = 16;
constexpr int64_t kMaxGridZ = 65535;

__global__ void __launch_bounds__(kTile* kTile)
    forward_kernel(const float* __restrict__ volume, ProjectorGrid grid, const double* __restrict__ views,
                   int64_t first_view, int64_t n_rows, int64_t n_cols, float* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t view = first_view + blockIdx.z;
  if (col >= n_cols || row >= n_rows) return;
  Ray ray;
  const bool hits = setup_ray(views + view * kViewFields, row, col, grid, ray);
  out[(view * n_rows + row) * n_cols + col] = hits ? ray_integral(volume, ray) : 0.0f;
}

__global__ void __launch_bounds__(kTile* kTile)
    adjoint_kernel(const float* __restrict__ projections, ProjectorGrid grid, const double* __restrict__ views,
                   int64_t first_view, int64_t n_rows, int64_t n_cols, float* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.y;
  const int64_t view = first_view + blockIdx.z;
  if (col >= n_cols || row >= n_rows) return;
  const float value = read_only(projections + (view * n_rows + row) * n_cols + col);
  if (value == 0.0f) return;  // adds nothing (the reference adds exact zeros)
  Ray ray;
  if (setup_ray(views + view * kViewFields, row, col, grid, ray)) ray_scatter(out, ray, value);
}

ProjectorGrid make_grid(int64_t nz, int64_t ny, int64_t nx, const double* spacing_xyz) {
  return ProjectorGrid{{nx, ny, nz}, {spacing_xyz[0], spacing_xyz[1], spacing_xyz[2]}};
}

template <typename Kernel>
int launch_views(Kernel kernel, const float* input, ProjectorGrid grid, const double* views, int64_t n_views,
                 int64_t n_rows, int64_t n_cols, float* out, cudaStream_t stream) {
  const dim3 block(kTile, kTile);
  for (int64_t first = 0; first < n_views; first += kMaxGridZ) {
    const int64_t count = n_views - first < kMaxGridZ ? n_views - first : kMaxGridZ;
    const dim3 blocks(static_cast<unsigned>((n_cols + kTile - 1) / kTile),
                      static_cast<unsigned>((n_rows + kTile - 1) / kTile), static_cast<unsigned>(count));
    kernel<<<blocks, block, 0, stream>>>(input, grid, views, first, n_rows, n_cols, out);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return static_cast<int>(status);
  }
  return 0;
}

}  // namespace

namespace cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int project_forward(const float* volume, int64_t nz, int64_t ny, int64_t nx, const double* views, int64_t n_views,
                    int64_t n_rows, int64_t n_cols, const double* spacing_xyz, float* out, void* stream) {
  if (n_views == 0 || n_rows == 0 || n_cols == 0) return 0;
  return launch_views(forward_kernel, volume, make_grid(nz, ny, nx, spacing_xyz), views, n_views, n_rows, n_cols,
                      out, static_cast<cudaStream_t>(stream));
}

int project_adjoint(const float* projections, int64_t n_views, int64_t n_rows, int64_t n_cols, const double* views,
                    const double* spacing_xyz, int64_t nz, int64_t ny, int64_t nx, float* out, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t status = cudaMemsetAsync(out, 0, sizeof(float) * nz * ny * nx, s);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (n_views == 0 || n_rows == 0 || n_cols == 0) return 0;
  return launch_views(adjoint_kernel, projections, make_grid(nz, ny, nx, spacing_xyz), views, n_views, n_rows,
                      n_cols, out, s);
}

}  // namespace cuda
}  // namespace ctrecon
