// Compiled CPU path of ctrecon/operators/projector.py: Joseph's cone-beam projector and its exact transpose.
//
// The discrete operator is the one documented in ctrecon/operators/projector.py and implemented there in
// PyTorch (the reference); this file computes the same sums faster. Per view the caller passes 12
// doubles in voxel-index coordinates (x, y, z): the source S, the centre D0 of pixel (0, 0), and the
// steps Du, Dv from one pixel column / row to the next. Pixel (r, c) is D0 + c·Du + r·Dv.
//
// Implementation notes:
//  * Each ray is set up once, in double precision, by the same code as the CUDA kernels: trace_ray of
//    cuda/projector.cuh (dominant axis, slopes, the slices whose samples can be nonzero), included here
//    as host code (the extension is built with the kernel source folder on its include path).
//  * The volume is read from (and the adjoint accumulates into) a zero-padded copy, one voxel wider on
//    every side, so that the bilinear interpolation needs no bounds tests (rays are traced in its
//    coordinates: origin 1). Float32 volumes on x86-64 CPUs with AVX2 process 8 slices at a time
//    (coordinates in double, interpolation in float, gathers); other cases run the scalar loop in double.
//  * Forward: threads share out the (view, detector row) pairs; every ray writes its own pixel.
//  * Adjoint: the volume is cut into slabs of z rows; a slab is owned by one thread at a time, which
//    visits every ray sample touching its rows and writes only those rows. No two threads write the
//    same voxel, no per-thread copies of the volume are needed, and the result does not depend on the
//    number of threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "projector.cuh"

#if defined(__GNUC__) && defined(__x86_64__)
#define CTRECON_AVX2 1
#include <immintrin.h>
#endif

namespace {

using ctrecon::clip_slices;
using ctrecon::kViewFields;

// The volume's grid and the strides of its padded [Z+2][Y+2][X+2] layout.
struct Grid {
  ctrecon::ProjectorGrid shape;  // voxel counts and sizes along x, y, z
  int64_t stride[3];
  int64_t padded_size;

  Grid(int64_t nz, int64_t ny, int64_t nx, const std::vector<double>& spacing_xyz)
      : shape{{nx, ny, nz}, {spacing_xyz[0], spacing_xyz[1], spacing_xyz[2]}},
        stride{1, nx + 2, (nx + 2) * (ny + 2)}, padded_size((nx + 2) * (ny + 2) * (nz + 2)) {}
};

// A ray traced in the padded grid's coordinates (P = p0 + s·dp, Q = q0 + s·dq at slice s) with the
// padded strides of its axes m, p, q.
struct PaddedRay : ctrecon::RayPath {
  int64_t stride_m, stride_p, stride_q;
};

inline bool setup_ray(const double* view, int64_t row, int64_t col, const Grid& g, PaddedRay& ray) {
  const bool hits = ctrecon::trace_ray(view, row, col, g.shape, 1.0, ray);
  ray.stride_m = g.stride[ray.m];
  ray.stride_p = g.stride[ray.p];
  ray.stride_q = g.stride[ray.q];
  return hits;
}

// Bilinear footprint of slice s: offset of the lower corner in the padded layout, its padded index
// along q, and the fractions fp, fq (weights (1-fp)(1-fq), fp(1-fq), (1-fp)fq, fp·fq).
struct Footprint {
  int64_t offset;
  int64_t iq;
  double fp, fq;
};

inline Footprint footprint(const PaddedRay& ray, int64_t s) {
  const double P = ray.p0 + static_cast<double>(s) * ray.dp;
  const double Q = ray.q0 + static_cast<double>(s) * ray.dq;
  // Truncation is floor for P, Q >= 0; min() keeps rounding at the far edge inside the padding.
  const int64_t ip = std::min<int64_t>(static_cast<int64_t>(P), ray.np);
  const int64_t iq = std::min<int64_t>(static_cast<int64_t>(Q), ray.nq);
  return {(s + 1) * ray.stride_m + ip * ray.stride_p + iq * ray.stride_q, iq, P - static_cast<double>(ip),
          Q - static_cast<double>(iq)};
}

// Σ over slices [begin, end) of the bilinear samples (without the length factor).
template <typename scalar_t>
double ray_sum(const scalar_t* data, const PaddedRay& ray, int64_t begin, int64_t end) {
  const int64_t sp = ray.stride_p, sq = ray.stride_q;
  double sum = 0.0;
  for (int64_t s = begin; s < end; ++s) {
    const Footprint f = footprint(ray, s);
    const scalar_t* v = data + f.offset;
    const double lower = v[0] + f.fp * (v[sp] - v[0]);
    const double upper = v[sq] + f.fp * (v[sq + sp] - v[sq]);
    sum += lower + f.fq * (upper - lower);
  }
  return sum;
}

// Add weighted·(bilinear weights) of slices [begin, end) to the four corners, writing only the
// corners whose padded q index lies in [row_lo, row_hi].
template <typename scalar_t>
void ray_scatter(scalar_t* data, const PaddedRay& ray, int64_t begin, int64_t end, double weighted, int64_t row_lo,
                 int64_t row_hi) {
  const int64_t sp = ray.stride_p, sq = ray.stride_q;
  for (int64_t s = begin; s < end; ++s) {
    const Footprint f = footprint(ray, s);
    scalar_t* v = data + f.offset;
    if (f.iq >= row_lo && f.iq <= row_hi) {
      const double lower = weighted * (1.0 - f.fq);
      v[0] += static_cast<scalar_t>(lower * (1.0 - f.fp));
      v[sp] += static_cast<scalar_t>(lower * f.fp);
    }
    if (f.iq + 1 >= row_lo && f.iq + 1 <= row_hi) {
      const double upper = weighted * f.fq;
      v[sq] += static_cast<scalar_t>(upper * (1.0 - f.fp));
      v[sq + sp] += static_cast<scalar_t>(upper * f.fp);
    }
  }
}

#ifdef CTRECON_AVX2
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Footprints of the 8 slices s..s+7 (the vector counterpart of footprint(); int32 offsets).
struct Footprint8 {
  __m256i offset, iq;
  __m256 fp, fq;
};

struct RayAvx2 {
  __m256d p0, dp, q0, dq;
  __m256i np, nq, stride_m, stride_p, stride_q;

  __attribute__((target("avx2,fma"))) explicit RayAvx2(const PaddedRay& ray)
      : p0(_mm256_set1_pd(ray.p0)), dp(_mm256_set1_pd(ray.dp)), q0(_mm256_set1_pd(ray.q0)),
        dq(_mm256_set1_pd(ray.dq)), np(_mm256_set1_epi32(static_cast<int>(ray.np))),
        nq(_mm256_set1_epi32(static_cast<int>(ray.nq))), stride_m(_mm256_set1_epi32(static_cast<int>(ray.stride_m))),
        stride_p(_mm256_set1_epi32(static_cast<int>(ray.stride_p))),
        stride_q(_mm256_set1_epi32(static_cast<int>(ray.stride_q))) {}

  __attribute__((target("avx2,fma"))) inline Footprint8 at(int64_t s) const {
    const __m256d s_lo = _mm256_add_pd(_mm256_set1_pd(static_cast<double>(s)), _mm256_setr_pd(0, 1, 2, 3));
    const __m256d s_hi = _mm256_add_pd(s_lo, _mm256_set1_pd(4.0));
    const __m256d P_lo = _mm256_fmadd_pd(s_lo, dp, p0), P_hi = _mm256_fmadd_pd(s_hi, dp, p0);
    const __m256d Q_lo = _mm256_fmadd_pd(s_lo, dq, q0), Q_hi = _mm256_fmadd_pd(s_hi, dq, q0);
    const __m128i ip_lo = _mm_min_epi32(_mm256_cvttpd_epi32(P_lo), _mm256_castsi256_si128(np));
    const __m128i ip_hi = _mm_min_epi32(_mm256_cvttpd_epi32(P_hi), _mm256_castsi256_si128(np));
    const __m128i iq_lo = _mm_min_epi32(_mm256_cvttpd_epi32(Q_lo), _mm256_castsi256_si128(nq));
    const __m128i iq_hi = _mm_min_epi32(_mm256_cvttpd_epi32(Q_hi), _mm256_castsi256_si128(nq));
    Footprint8 f;
    f.fp = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(P_hi, _mm256_cvtepi32_pd(ip_hi))),
                           _mm256_cvtpd_ps(_mm256_sub_pd(P_lo, _mm256_cvtepi32_pd(ip_lo))));
    f.fq = _mm256_set_m128(_mm256_cvtpd_ps(_mm256_sub_pd(Q_hi, _mm256_cvtepi32_pd(iq_hi))),
                           _mm256_cvtpd_ps(_mm256_sub_pd(Q_lo, _mm256_cvtepi32_pd(iq_lo))));
    const __m256i slice =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(s + 1)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    f.iq = _mm256_set_m128i(iq_hi, iq_lo);
    f.offset = _mm256_add_epi32(_mm256_mullo_epi32(slice, stride_m),
                                _mm256_add_epi32(_mm256_mullo_epi32(_mm256_set_m128i(ip_hi, ip_lo), stride_p),
                                                 _mm256_mullo_epi32(f.iq, stride_q)));
    return f;
  }
};

__attribute__((target("avx2,fma"))) double ray_sum_avx2(const float* data, const PaddedRay& ray) {
  const RayAvx2 simd(ray);
  const float* corner[4] = {data, data + ray.stride_p, data + ray.stride_q, data + ray.stride_p + ray.stride_q};
  __m256 acc = _mm256_setzero_ps();
  int64_t s = ray.begin;
  for (; s + 8 <= ray.end; s += 8) {
    const Footprint8 f = simd.at(s);
    const __m256 v00 = _mm256_i32gather_ps(corner[0], f.offset, 4);
    const __m256 v10 = _mm256_i32gather_ps(corner[1], f.offset, 4);
    const __m256 v01 = _mm256_i32gather_ps(corner[2], f.offset, 4);
    const __m256 v11 = _mm256_i32gather_ps(corner[3], f.offset, 4);
    const __m256 lower = _mm256_fmadd_ps(f.fp, _mm256_sub_ps(v10, v00), v00);
    const __m256 upper = _mm256_fmadd_ps(f.fp, _mm256_sub_ps(v11, v01), v01);
    acc = _mm256_add_ps(acc, _mm256_fmadd_ps(f.fq, _mm256_sub_ps(upper, lower), lower));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  double sum = 0.0;
  for (const float lane : lanes) sum += lane;
  _mm256_zeroupper();  // GCC does not emit it here; SSE code after dirty AVX state runs slowly
  return sum + ray_sum(data, ray, s, ray.end);
}

__attribute__((target("avx2,fma"))) void ray_scatter_avx2(float* data, const PaddedRay& ray, int64_t begin, int64_t end,
                                                        double weighted, int64_t row_lo, int64_t row_hi) {
  const RayAvx2 simd(ray);
  const int64_t sp = ray.stride_p, sq = ray.stride_q;
  const __m256 w = _mm256_set1_ps(static_cast<float>(weighted)), one = _mm256_set1_ps(1.0f);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(std::max<int64_t>(row_lo, -1) - 1));
  const __m256i above = _mm256_set1_epi32(static_cast<int>(std::min<int64_t>(row_hi, ray.nq + 2) + 1));
  alignas(32) int32_t offset[8], lower_owned[8], upper_owned[8];
  alignas(32) float w00[8], w10[8], w01[8], w11[8];
  int64_t s = begin;
  for (; s + 8 <= end; s += 8) {
    const Footprint8 f = simd.at(s);
    const __m256 lower = _mm256_mul_ps(w, _mm256_sub_ps(one, f.fq)), upper = _mm256_mul_ps(w, f.fq);
    _mm256_store_ps(w00, _mm256_fnmadd_ps(lower, f.fp, lower));
    _mm256_store_ps(w10, _mm256_mul_ps(lower, f.fp));
    _mm256_store_ps(w01, _mm256_fnmadd_ps(upper, f.fp, upper));
    _mm256_store_ps(w11, _mm256_mul_ps(upper, f.fp));
    _mm256_store_si256(reinterpret_cast<__m256i*>(offset), f.offset);
    const __m256i iq1 = _mm256_add_epi32(f.iq, _mm256_set1_epi32(1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(lower_owned),
                       _mm256_and_si256(_mm256_cmpgt_epi32(f.iq, below), _mm256_cmpgt_epi32(above, f.iq)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(upper_owned),
                       _mm256_and_si256(_mm256_cmpgt_epi32(iq1, below), _mm256_cmpgt_epi32(above, iq1)));
    for (int lane = 0; lane < 8; ++lane) {
      float* v = data + offset[lane];
      if (lower_owned[lane]) {
        v[0] += w00[lane];
        v[sp] += w10[lane];
      }
      if (upper_owned[lane]) {
        v[sq] += w01[lane];
        v[sq + sp] += w11[lane];
      }
    }
  }
  _mm256_zeroupper();
  ray_scatter(data, ray, s, end, weighted, row_lo, row_hi);
}
#endif

// Whether float32 data on this grid goes through the AVX2 kernels (int32 offsets must fit).
template <typename scalar_t>
bool use_avx2(const Grid& g) {
#ifdef CTRECON_AVX2
  return std::is_same<scalar_t, float>::value && g.padded_size < std::numeric_limits<int32_t>::max() && cpu_has_avx2();
#else
  return false;
#endif
}

template <typename scalar_t>
double ray_integral(const scalar_t* data, const PaddedRay& ray, bool avx2) {
#ifdef CTRECON_AVX2
  if (avx2) return ray_sum_avx2(reinterpret_cast<const float*>(data), ray) * ray.length;
#endif
  return ray_sum(data, ray, ray.begin, ray.end) * ray.length;
}

template <typename scalar_t>
void ray_spread(scalar_t* data, const PaddedRay& ray, int64_t begin, int64_t end, double weighted, int64_t row_lo,
                int64_t row_hi, bool avx2) {
#ifdef CTRECON_AVX2
  if (avx2) return ray_scatter_avx2(reinterpret_cast<float*>(data), ray, begin, end, weighted, row_lo, row_hi);
#endif
  ray_scatter(data, ray, begin, end, weighted, row_lo, row_hi);
}

// body(i) for i in [0, n) on torch's threads, handing items out one at a time: on a busy machine the
// threads that get more CPU take more items (a static split waits for the slowest thread).
template <typename F>
void parallel_items(int64_t n, const F& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i);
  });
}

template <typename scalar_t>
std::vector<scalar_t> pad(const scalar_t* volume, const Grid& g) {
  std::vector<scalar_t> padded(g.padded_size, scalar_t(0));
  const int64_t nx = g.shape.n[0], ny = g.shape.n[1];
  at::parallel_for(0, g.shape.n[2], 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t j = 0; j < ny; ++j) {
        const scalar_t* src = volume + (k * ny + j) * nx;
        std::copy(src, src + nx, padded.data() + (k + 1) * g.stride[2] + (j + 1) * g.stride[1] + 1);
      }
    }
  });
  return padded;
}

template <typename scalar_t>
void forward_impl(const scalar_t* volume, const Grid& g, const double* views, int64_t n_views, int64_t n_rows,
                  int64_t n_cols, scalar_t* out) {
  const std::vector<scalar_t> padded = pad(volume, g);
  const bool avx2 = use_avx2<scalar_t>(g);
  parallel_items(n_views * n_rows, [&](int64_t item) {  // one (view, detector row) per item
    const double* view = views + (item / n_rows) * kViewFields;
    const int64_t r = item % n_rows;
    scalar_t* pixel = out + item * n_cols;
    PaddedRay ray;
    for (int64_t c = 0; c < n_cols; ++c) {
      pixel[c] = setup_ray(view, r, c, g, ray) ? static_cast<scalar_t>(ray_integral(padded.data(), ray, avx2))
                                               : scalar_t(0);
    }
  });
}

// Depth range, as the ray parameter t (0 at the source, 1 on the detector), of the box that holds
// every sample with a nonzero weight: [-1, n]^3 in voxel-index coordinates.
inline void depth_range(const double* view, const Grid& g, double& t_min, double& t_max) {
  const double* S = view;
  const double* D0 = view + 3;
  const double* Du = view + 6;
  const double* Dv = view + 9;
  const double normal[3] = {Du[1] * Dv[2] - Du[2] * Dv[1], Du[2] * Dv[0] - Du[0] * Dv[2],
                            Du[0] * Dv[1] - Du[1] * Dv[0]};
  const double depth = (D0[0] - S[0]) * normal[0] + (D0[1] - S[1]) * normal[1] + (D0[2] - S[2]) * normal[2];
  t_min = INFINITY;
  t_max = -INFINITY;
  for (int corner = 0; corner < 8; ++corner) {
    double t = 0.0;
    for (int k = 0; k < 3; ++k) {
      const double x = (corner >> k & 1) ? static_cast<double>(g.shape.n[k]) : -1.0;
      t += (x - S[k]) * normal[k];
    }
    t /= depth;
    t_min = std::min(t_min, t);
    t_max = std::max(t_max, t);
  }
}

// Scatter every sample of every ray into the rows [k_begin, k_end) (unpadded z) of the padded accumulator.
template <typename scalar_t>
void adjoint_slab(const scalar_t* proj, const Grid& g, const double* views, int64_t n_views, int64_t n_rows,
                  int64_t n_cols, int64_t k_begin, int64_t k_end, bool avx2, scalar_t* data) {
  const int64_t own_lo = k_begin + 1, own_hi = k_end;  // padded z rows owned, inclusive
  PaddedRay ray;
  for (int64_t a = 0; a < n_views; ++a) {
    const double* view = views + a * kViewFields;
    double t_min, t_max;
    depth_range(view, g, t_min, t_max);
    const double source_z = view[2];
    for (int64_t r = 0; r < n_rows; ++r) {
      // z of this row's rays inside the box: extremes at the corners of (t, column) space.
      double z_min = INFINITY, z_max = -INFINITY;
      for (const int64_t c : {int64_t(0), n_cols - 1}) {
        const double pixel_z = view[5] + static_cast<double>(c) * view[8] + static_cast<double>(r) * view[11];
        for (const double t : {t_min, t_max}) {
          const double z = source_z + t * (pixel_z - source_z);
          z_min = std::min(z_min, z);
          z_max = std::max(z_max, z);
        }
      }
      if (z_max < static_cast<double>(k_begin) - 2.0 || z_min > static_cast<double>(k_end) + 1.0) continue;
      const scalar_t* values = proj + (a * n_rows + r) * n_cols;
      for (int64_t c = 0; c < n_cols; ++c) {
        const double value = static_cast<double>(values[c]);
        if (value == 0.0 || !setup_ray(view, r, c, g, ray)) continue;
        const double weighted = value * ray.length;
        if (ray.m == 2) {  // z-dominant: slice s is row s; every in-plane corner is in that row
          ray_spread(data, ray, std::max(ray.begin, k_begin), std::min(ray.end, k_end), weighted, 0, ray.nq + 1,
                     avx2);
          continue;
        }
        // q is z: a sample touches the slab when its lower row iq (padded) is in [own_lo - 1, own_hi],
        // i.e. own_lo - 1 <= Q < own_hi + 1. Take a wider open interval and one slice of margin either
        // side against rounding; the row tests in ray_spread decide exactly, with the forward footprint.
        int64_t lo = ray.begin, hi = ray.end;
        clip_slices(ray.q0, ray.dq, static_cast<double>(own_lo) - 2.0, static_cast<double>(own_hi) + 1.0, lo, hi);
        ray_spread(data, ray, std::max(ray.begin, lo - 1), std::min(ray.end, hi + 1), weighted, own_lo, own_hi,
                   avx2);
      }
    }
  }
}

template <typename scalar_t>
void adjoint_impl(const scalar_t* proj, const Grid& g, const double* views, int64_t n_views, int64_t n_rows,
                  int64_t n_cols, int64_t slab_rows, scalar_t* out) {
  std::vector<scalar_t> padded(g.padded_size, scalar_t(0));
  const bool avx2 = use_avx2<scalar_t>(g);
  const int64_t nz = g.shape.n[2];
  parallel_items((nz + slab_rows - 1) / slab_rows, [&](int64_t slab) {
    const int64_t k_begin = slab * slab_rows, k_end = std::min(nz, k_begin + slab_rows);
    adjoint_slab(proj, g, views, n_views, n_rows, n_cols, k_begin, k_end, avx2, padded.data());
  });
  const int64_t nx = g.shape.n[0], ny = g.shape.n[1];
  at::parallel_for(0, nz, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t j = 0; j < ny; ++j) {
        const scalar_t* src = padded.data() + (k + 1) * g.stride[2] + (j + 1) * g.stride[1] + 1;
        std::copy(src, src + nx, out + (k * ny + j) * nx);
      }
    }
  });
}

void check_views(const torch::Tensor& views) {
  TORCH_CHECK(views.device().is_cpu() && views.scalar_type() == torch::kFloat64 && views.is_contiguous() &&
                  views.dim() == 2 && views.size(1) == kViewFields,
              "views must be a contiguous CPU float64 tensor [A, 12]");
}

// volume [Z, Y, X] -> out [A, V, U] (both contiguous CPU, same floating dtype).
void forward(const torch::Tensor& volume, const torch::Tensor& views, const std::vector<double>& spacing_xyz,
             torch::Tensor out) {
  check_views(views);
  TORCH_CHECK(spacing_xyz.size() == 3, "spacing must hold (dx, dy, dz)");
  TORCH_CHECK(volume.device().is_cpu() && volume.is_contiguous() && volume.dim() == 3,
              "volume must be contiguous CPU [Z, Y, X]");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 3 && out.size(0) == views.size(0) &&
                  out.scalar_type() == volume.scalar_type(),
              "out must be contiguous CPU [A, V, U] of the volume's dtype");
  const Grid g(volume.size(0), volume.size(1), volume.size(2), spacing_xyz);
  AT_DISPATCH_FLOATING_TYPES(volume.scalar_type(), "ctrecon_forward", [&] {
    forward_impl<scalar_t>(volume.data_ptr<scalar_t>(), g, views.data_ptr<double>(), out.size(0), out.size(1),
                           out.size(2), out.data_ptr<scalar_t>());
  });
}

// projections [A, V, U] -> out [Z, Y, X]: the exact transpose of forward().
void adjoint(const torch::Tensor& projections, const torch::Tensor& views, const std::vector<double>& spacing_xyz,
             int64_t slab_rows, torch::Tensor out) {
  check_views(views);
  TORCH_CHECK(spacing_xyz.size() == 3, "spacing must hold (dx, dy, dz)");
  TORCH_CHECK(slab_rows >= 1, "slab_rows must be positive");
  TORCH_CHECK(projections.device().is_cpu() && projections.is_contiguous() && projections.dim() == 3 &&
                  projections.size(0) == views.size(0),
              "projections must be contiguous CPU [A, V, U]");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 3 &&
                  out.scalar_type() == projections.scalar_type(),
              "out must be contiguous CPU [Z, Y, X] of the projections' dtype");
  const Grid g(out.size(0), out.size(1), out.size(2), spacing_xyz);
  AT_DISPATCH_FLOATING_TYPES(projections.scalar_type(), "ctrecon_adjoint", [&] {
    adjoint_impl<scalar_t>(projections.data_ptr<scalar_t>(), g, views.data_ptr<double>(), projections.size(0),
                           projections.size(1), projections.size(2), slab_rows, out.data_ptr<scalar_t>());
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Joseph cone-beam projection of volume [Z,Y,X] into out [A,V,U]", py::arg("volume"),
        py::arg("views"), py::arg("spacing"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("adjoint", &adjoint, "Exact transpose of forward: projections [A,V,U] into out [Z,Y,X]",
        py::arg("projections"), py::arg("views"), py::arg("spacing"), py::arg("slab_rows"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
}
