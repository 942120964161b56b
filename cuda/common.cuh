// Helpers shared by the ctrecon CUDA kernels. Torch-free, and valid plain C++ when not compiled by nvcc:
// every per-thread function of the kernels is CTRECON_HD, so the same code runs in the kernels, in the
// compiled CPU kernels that include these headers (ctrecon/operators/csrc: the projector's ray set-up,
// the voxelizer's q) and in the serial CPU emulation of tests/test_cuda.py (tests/cuda_emulation.cpp),
// which checks the index arithmetic against the torch references on machines without a GPU.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CTRECON_HD __host__ __device__ __forceinline__
#else
#define CTRECON_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define CTRECON_UNROLL _Pragma("unroll")
#else
#define CTRECON_UNROLL
#endif

namespace ctrecon {

template <typename T>
CTRECON_HD T min_of(T a, T b) { return b < a ? b : a; }

template <typename T>
CTRECON_HD T max_of(T a, T b) { return a < b ? b : a; }

// Correctly rounded arithmetic that nvcc may not contract into FMAs. Used where a discontinuous decision
// (a ray's dominant axis, the q <= k^2 truncation test) must see exactly the values that the torch
// reference computes with one rounding per operation. Host builds of the emulation use
// -ffp-contract=off, so plain operators round the same way there.
CTRECON_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

CTRECON_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

CTRECON_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

CTRECON_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

CTRECON_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

CTRECON_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// A read of data that no thread of the launch writes (the read-only / texture data path on the GPU).
CTRECON_HD float read_only(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// out += value where other threads may add to the same address (atomicAdd on the GPU).
CTRECON_HD void accumulate(float* out, float value) {
#ifdef __CUDA_ARCH__
  atomicAdd(out, value);
#else
  *out += value;
#endif
}

// torch.lerp(start, end, weight) for float32, with torch's formula (exact at both ends).
CTRECON_HD float lerp(float start, float end, float weight) {
  const float diff = end - start;
  return weight < 0.5f ? start + weight * diff : end - diff * (1.0f - weight);
}

}  // namespace ctrecon
