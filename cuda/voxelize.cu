// Gaussian voxelizer on the GPU: tile binning, and tile-based forward / backward for dense grids and
// query points (the per-thread arithmetic is in voxelize.cuh, which also describes the semantics).
//
// One block of kVoxelizeBlock threads per tile key (batch item × tile). The block walks the tile's
// Gaussian list in batches of kVoxelizeBlock: each thread stages one Gaussian in shared memory, then every
// thread evaluates the whole batch at its own site. No thread ever walks a Gaussian's box: the work per
// thread is (Gaussians listed for its tile) × (its site). Point tiles with more points than threads are
// processed in chunks of kVoxelizeBlock points.
//
// Forward: each site sums its values in a register, in list order (increasing Gaussian index), and
// writes its output once: deterministic.
// Backward: per (Gaussian, tile) the block reduces the site moments Σ w·(1, d, d dᵀ) — a warp-shuffle
// sum per warp (skipped when no lane of the warp is inside the Gaussian), shared-memory atomics across the
// warps, then one global atomicAdd per moment and tile. The moments are turned into gradients for μ, the
// precision entries and I in torch (ctrecon/operators/voxelize.py), where autograd finishes the chain through the
// covariance and the quaternion. Float atomics make the backward's low bits run-to-run nondeterministic.
#include <cuda_runtime.h>

#include "kernels.h"
#include "voxelize.cuh"

namespace ctrecon {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__global__ void __launch_bounds__(kVoxelizeBlock)
    tile_count_kernel(Boxes boxes, int64_t n_gaussians, Lattice lattice, int64_t* __restrict__ counts) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < n_gaussians) counts[g] = tile_count(boxes, g, lattice);
}

__global__ void __launch_bounds__(kVoxelizeBlock)
    tile_pair_kernel(Boxes boxes, const int64_t* __restrict__ ends, int64_t n_gaussians, int64_t n_pairs,
                     Lattice lattice, int32_t* __restrict__ keys, int32_t* __restrict__ ids) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair >= n_pairs) return;
  int64_t gaussian;
  keys[pair] = static_cast<int32_t>(pair_tile_key(boxes, ends, n_gaussians, pair, lattice, gaussian));
  ids[pair] = static_cast<int32_t>(gaussian);
}

__global__ void __launch_bounds__(kVoxelizeBlock)
    point_key_kernel(const int32_t* __restrict__ cells, int64_t n_points, int64_t points_per_item, Lattice lattice,
                     int32_t* __restrict__ keys) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < n_points) keys[row] = static_cast<int32_t>(cell_tile_key(row / points_per_item, cells + 3 * row, lattice));
}

template <class Sites>
__global__ void __launch_bounds__(kVoxelizeBlock)
    forward_kernel(Gaussians gaussians, TileLists lists, Sites sites, float k2, float* __restrict__ out) {
  __shared__ GaussianRecord batch[kVoxelizeBlock];
  const int64_t key = blockIdx.x;
  const int thread = threadIdx.x;
  const int64_t first = list_begin(lists.ends, key), last = lists.ends[key];
  if (first == last) return;  // the output was zeroed; block-uniform exit
  const int64_t chunks = site_chunks(sites, key);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    Site site;
    int64_t out_index = 0;
    const bool active = site_of(sites, key, chunk, thread, site, out_index);
    float value = 0.0f;
    for (int64_t start = first; start < last; start += kVoxelizeBlock) {
      const int count = static_cast<int>(min_of<int64_t>(kVoxelizeBlock, last - start));
      if (thread < count) batch[thread] = load_gaussian(gaussians, lists.ids[start + thread]);
      __syncthreads();
      if (active) {
        for (int n = 0; n < count; ++n) value += gaussian_value(batch[n], site, k2);
      }
      __syncthreads();  // the batch is overwritten next
    }
    if (active) out[out_index] = value;
  }
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(kFullMask, value, offset);
  return value;
}

template <class Sites>
__global__ void __launch_bounds__(kVoxelizeBlock)
    backward_kernel(Gaussians gaussians, TileLists lists, Sites sites, float k2, const float* __restrict__ grad_out,
                    float* __restrict__ moments) {
  __shared__ GaussianRecord batch[kVoxelizeBlock];
  __shared__ float sums[kVoxelizeBlock][kMoments];
  const int64_t key = blockIdx.x;
  const int thread = threadIdx.x, lane = threadIdx.x % kWarp;
  const int64_t first = list_begin(lists.ends, key), last = lists.ends[key];
  if (first == last) return;
  const int64_t chunks = site_chunks(sites, key);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    Site site;
    int64_t out_index = 0;
    const bool active = site_of(sites, key, chunk, thread, site, out_index);
    const float grad = active ? grad_out[out_index] : 0.0f;
    for (int64_t start = first; start < last; start += kVoxelizeBlock) {
      const int count = static_cast<int>(min_of<int64_t>(kVoxelizeBlock, last - start));
      if (thread < count) {
        batch[thread] = load_gaussian(gaussians, lists.ids[start + thread]);
        for (int c = 0; c < kMoments; ++c) sums[thread][c] = 0.0f;
      }
      __syncthreads();
      for (int n = 0; n < count; ++n) {  // count is block-uniform: every lane takes part in the shuffles
        float m[kMoments];
        bool nonzero = false;
        if (active && grad != 0.0f) nonzero = gaussian_moments(batch[n], site, k2, grad, m);
        if (!__any_sync(kFullMask, nonzero)) continue;  // warp-uniform
        if (!nonzero) {
          for (int c = 0; c < kMoments; ++c) m[c] = 0.0f;
        }
        for (int c = 0; c < kMoments; ++c) m[c] = warp_sum(m[c]);
        if (lane == 0) {
          for (int c = 0; c < kMoments; ++c) atomicAdd(&sums[n][c], m[c]);
        }
      }
      __syncthreads();
      if (thread < count) {
        float* target = moments + static_cast<int64_t>(lists.ids[start + thread]) * kMoments;
        for (int c = 0; c < kMoments; ++c) {
          if (sums[thread][c] != 0.0f) atomicAdd(target + c, sums[thread][c]);
        }
      }
      __syncthreads();  // batch and sums are overwritten next
    }
  }
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kVoxelizeBlock - 1) / kVoxelizeBlock); }

int status() { return static_cast<int>(cudaGetLastError()); }

template <class Sites>
int forward(Gaussians gaussians, TileLists lists, Sites sites, int64_t n_keys, float k2, float* out, int64_t n_out,
            void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t cleared = cudaMemsetAsync(out, 0, sizeof(float) * n_out, s);
  if (cleared != cudaSuccess) return static_cast<int>(cleared);
  if (n_keys == 0) return 0;
  forward_kernel<Sites><<<static_cast<unsigned>(n_keys), kVoxelizeBlock, 0, s>>>(gaussians, lists, sites, k2, out);
  return status();
}

template <class Sites>
int backward(Gaussians gaussians, TileLists lists, Sites sites, int64_t n_keys, float k2, const float* grad_out,
             float* moments, int64_t n_gaussians, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const cudaError_t cleared = cudaMemsetAsync(moments, 0, sizeof(float) * kMoments * n_gaussians, s);
  if (cleared != cudaSuccess) return static_cast<int>(cleared);
  if (n_keys == 0) return 0;
  backward_kernel<Sites><<<static_cast<unsigned>(n_keys), kVoxelizeBlock, 0, s>>>(gaussians, lists, sites, k2,
                                                                                 grad_out, moments);
  return status();
}

}  // namespace

namespace cuda {

int gaussian_tile_counts(Boxes boxes, int64_t n_gaussians, Lattice lattice, int64_t* counts, void* stream) {
  if (n_gaussians == 0) return 0;
  tile_count_kernel<<<blocks_for(n_gaussians), kVoxelizeBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      boxes, n_gaussians, lattice, counts);
  return status();
}

int gaussian_tile_pairs(Boxes boxes, const int64_t* ends, int64_t n_gaussians, int64_t n_pairs, Lattice lattice,
                        int32_t* keys, int32_t* ids, void* stream) {
  if (n_pairs == 0) return 0;
  tile_pair_kernel<<<blocks_for(n_pairs), kVoxelizeBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      boxes, ends, n_gaussians, n_pairs, lattice, keys, ids);
  return status();
}

int point_tile_keys(const int32_t* cells, int64_t n_points, int64_t points_per_item, Lattice lattice, int32_t* keys,
                    void* stream) {
  if (n_points == 0) return 0;
  point_key_kernel<<<blocks_for(n_points), kVoxelizeBlock, 0, static_cast<cudaStream_t>(stream)>>>(
      cells, n_points, points_per_item, lattice, keys);
  return status();
}

int voxelize_dense_forward(Gaussians gaussians, TileLists lists, DenseSites sites, int64_t n_keys, float k2,
                           float* out, int64_t n_out, void* stream) {
  return forward(gaussians, lists, sites, n_keys, k2, out, n_out, stream);
}

int voxelize_points_forward(Gaussians gaussians, TileLists lists, PointSites sites, int64_t n_keys, float k2,
                            float* out, int64_t n_out, void* stream) {
  return forward(gaussians, lists, sites, n_keys, k2, out, n_out, stream);
}

int voxelize_dense_backward(Gaussians gaussians, TileLists lists, DenseSites sites, int64_t n_keys, float k2,
                            const float* grad_out, float* moments, int64_t n_gaussians, void* stream) {
  return backward(gaussians, lists, sites, n_keys, k2, grad_out, moments, n_gaussians, stream);
}

int voxelize_points_backward(Gaussians gaussians, TileLists lists, PointSites sites, int64_t n_keys, float k2,
                             const float* grad_out, float* moments, int64_t n_gaussians, void* stream) {
  return backward(gaussians, lists, sites, n_keys, k2, grad_out, moments, n_gaussians, stream);
}

}  // namespace cuda
}  // namespace ctrecon
