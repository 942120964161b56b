// Gaussian voxelizer, CPU (OpenMP): the compiled twin of the PyTorch reference in
// ctrecon/operators/voxelize.py, whose docstring defines the semantics (q order, q <= k^2 inclusive,
// voxel centres from float64 tables rounded to the working dtype). q is evaluated by the same code as the
// CUDA kernels (row_linear_term, row_constant_term, row_mahalanobis of cuda/voxelize.cuh, included here as
// host code; row_mahalanobis runs on packs of voxels of a row).
//
// forward(means, scales, quats, intensities, ...), one call per render:
//   set-up : per Gaussian the precision entries P (the operations of voxelize.precision_entries in the same
//            order, so P is bit-identical to the reference's and so is every truncation test) and its voxel
//            box (the bounding box of q <= k2 widened by `slack` voxels, as voxelize._voxel_boxes; the box only
//            limits the work); then the Gaussians sorted by box start (item, lo_z, lo_y, lo_x) with two stable
//            counting sorts, as one record (a cache line for float32) each: a slab finds its Gaussians by
//            binary search, and neighbouring Gaussians touch neighbouring memory;
//   render : out[b, z, y, x] = sum_g I_g exp(-q/2) [q <= k2], parallel over slabs of up to kSlab (b, z) slices,
//            each slab owned by one thread (no atomics, deterministic Gaussian order).
// moments (the backward): per Gaussian sum w (1, dx, dy, dz, dx², dxdy, dxdz, dy², dydz, dz²) over its box,
//   w = upstream gradient × exp(-q/2), as the CUDA kernels return them, in the caller's Gaussian order;
//   parallel over Gaussians (no atomics). voxelize.gradients_from_moments turns them into gradients for μ,
//   P and I, and precision_backward carries the gradient of P to the scales and quaternions (the chain of
//   precision_entries, analytically, in float64).
// Rows whose minimum of q exceeds k2 are skipped; a row wider than a pack is cut to the analytic x-interval
// of the quadratic q(dx), widened by one voxel on each side; the exact q <= k2 test then decides each voxel
// exactly as the reference does.
//
// Vectorisation: a row is evaluated in packs of 32 bytes of voxels (8 float32, 4 float64; GCC/Clang vector
// extensions), the forward into a private slab with padded rows, so that a pack never writes outside its row.
// q is computed per lane with the operations of the scalar code (no FMA contraction: the x86-64 AVX2 variants
// are compiled without FMA), so the truncation test is bit-identical; exp is a Cephes-style polynomial for
// float32 (about 1 ulp; std::exp for float64).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "voxelize.cuh"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CTRECON_VOXELIZE_AVX2 1
#endif
#if defined(__GNUC__) && !defined(__clang__)
// Packs are passed only between always-inline functions: no call with a 32-byte vector argument remains.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

#define CTRECON_PACK inline __attribute__((always_inline))

// ------------------------------------------------------------------ packs of lanes
// 32-byte vectors of T and of the same-sized integers (lane masks).
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  using Int = int32_t;
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(32)));
};
template <> struct Lanes<double> {
  using Int = int64_t;
  typedef double vec __attribute__((vector_size(32)));
  typedef int64_t ivec __attribute__((vector_size(32)));
};

// 32 bytes of T. mul_rn / add_rn are found by argument-dependent lookup from the templates of voxelize.cuh,
// so row_mahalanobis<Pack<T>> evaluates q lane by lane with the scalar code's operations.
template <typename T>
struct Pack {
  using Int = typename Lanes<T>::Int;
  using vec = typename Lanes<T>::vec;
  using ivec = typename Lanes<T>::ivec;
  static constexpr int kLanes = 32 / sizeof(T);
  vec v;

  CTRECON_PACK Pack() = default;
  CTRECON_PACK Pack(T s) : v(vec{} + s) {}  // broadcast
  CTRECON_PACK explicit Pack(vec x) : v(x) {}
  static CTRECON_PACK Pack load(const T* p) {
    Pack r;
    std::memcpy(&r.v, p, sizeof(vec));
    return r;
  }
  CTRECON_PACK void store(T* p) const { std::memcpy(p, &v, sizeof(vec)); }
  // Lanes whose mask is all ones, zero elsewhere.
  CTRECON_PACK Pack masked(ivec mask) const { return Pack(reinterpret_cast<vec>(reinterpret_cast<ivec>(v) & mask)); }
  CTRECON_PACK T sum() const {
    T total = 0;
    for (int l = 0; l < kLanes; ++l) total += v[l];
    return total;
  }

  friend CTRECON_PACK Pack mul_rn(Pack a, Pack b) { return Pack(a.v * b.v); }
  friend CTRECON_PACK Pack add_rn(Pack a, Pack b) { return Pack(a.v + b.v); }
  friend CTRECON_PACK Pack operator*(Pack a, Pack b) { return Pack(a.v * b.v); }
  friend CTRECON_PACK Pack operator+(Pack a, Pack b) { return Pack(a.v + b.v); }
  friend CTRECON_PACK Pack operator-(Pack a, Pack b) { return Pack(a.v - b.v); }
  CTRECON_PACK Pack& operator+=(Pack b) {
    v += b.v;
    return *this;
  }
};

template <typename T>
CTRECON_PACK typename Pack<T>::ivec lane_index() {
  typename Pack<T>::ivec index;
  for (int l = 0; l < Pack<T>::kLanes; ++l) index[l] = l;
  return index;
}

// exp of every lane: float32 by range reduction x = n ln2 + r (Cody-Waite) and Cephes' degree-6 polynomial
// (relative error about 1e-7), arguments clamped to [-87, 88] (results below e^-87 ≈ 1.6e-38 are not
// needed); float64 by std::exp.
CTRECON_PACK Pack<float> exp_lanes(Pack<float> x) {
  using vec = Pack<float>::vec;
  using ivec = Pack<float>::ivec;
  vec a = x.v;
  a = a < -87.0f ? vec{} - 87.0f : a;
  a = a > 88.0f ? vec{} + 88.0f : a;
  const vec magic = vec{} + 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const vec n = (a * 1.44269504088896341f + magic) - magic;
  const vec r = (a - n * 0.693359375f) - n * -2.12194440e-4f;
  // Cephes' polynomial, evaluated by Estrin's scheme (a shorter dependency chain than Horner's)
  const vec r2 = r * r, r4 = r2 * r2;
  const vec p = ((r * 1.9875691500e-4f + 1.3981999507e-3f) * r4 + (r * 8.3334519073e-3f + 4.1665795894e-2f) * r2) +
                (r * 1.6666665459e-1f + 5.0000001201e-1f);
  const vec e = (p * r2 + r) + 1.0f;
  const ivec scale = (__builtin_convertvector(n, ivec) + 127) << 23;
  return Pack<float>(e * reinterpret_cast<vec>(scale));
}

CTRECON_PACK Pack<double> exp_lanes(Pack<double> x) {
  for (int l = 0; l < Pack<double>::kLanes; ++l) x.v[l] = std::exp(x.v[l]);
  return x;
}

bool use_avx2() {
#ifdef CTRECON_VOXELIZE_AVX2
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

// ------------------------------------------------------------------ the grid and the sorted Gaussians
struct Grid {
  int64_t n[3];       // voxels along x, y, z
  double first[3];    // centre of voxel 0 along x, y, z
  double spacing[3];  // along x, y, z
  int64_t stride;     // padded row length of the forward's slabs: X + lanes
};

Grid make_grid(const torch::Tensor& xs, const torch::Tensor& ys, const torch::Tensor& zs,
               const std::vector<double>& first, const std::vector<double>& spacing, int lanes) {
  TORCH_CHECK(first.size() == 3 && spacing.size() == 3, "first and spacing must hold (x, y, z)");
  for (const auto* t : {&xs, &ys, &zs})
    TORCH_CHECK(t->size(0) < (int64_t(1) << 30), "the CPU voxelizer takes fewer than 2^30 voxels per axis");
  return Grid{{xs.size(0), ys.size(0), zs.size(0)},
              {first[0], first[1], first[2]},
              {spacing[0], spacing[1], spacing[2]},
              xs.size(0) + lanes};
}

// A Gaussian as the kernels read it (one cache line for float32): centre, precision entries, intensity and
// its inclusive voxel box (x, y, z), empty when some hi < lo.
template <typename T>
struct Record {
  T mean[3];
  T prec[6];
  T intensity;
  int32_t lo[3], hi[3];
};

template <typename T>
struct Problem {
  const Record<T>* records;  // [G] sorted by box start within each item (see the file comment), G = B·N
  const int64_t* order;      // [G]: the caller's index of each
  const T* xs;  // padded to Grid::stride entries
  const T* ys;
  const T* zs;
  int64_t B, N;
  Grid grid;
  double k2;
};

inline int64_t floor_index(double f) {
  const int64_t t = static_cast<int64_t>(f);
  return t - (static_cast<double>(t) > f);
}

inline int64_t ceil_index(double f) {
  const int64_t t = static_cast<int64_t>(f);
  return t + (static_cast<double>(t) < f);
}

// ------------------------------------------------------------------ set-up: precision, boxes, order
// Rotation R (row-major) of quaternion (w, x, y, z), normalised: voxelize.quaternion_to_rotation, operation by
// operation (no square root: torch's is not correctly rounded, these operations are).
template <typename T>
inline void rotation_of(const T* quat, T* R) {
  const T w = quat[0], x = quat[1], y = quat[2], z = quat[3];
  const T s = T(2) / (((w * w + x * x) + y * y) + z * z);
  R[0] = T(1) - s * (y * y + z * z);
  R[1] = s * (x * y - w * z);
  R[2] = s * (x * z + w * y);
  R[3] = s * (x * y + w * z);
  R[4] = T(1) - s * (x * x + z * z);
  R[5] = s * (y * z - w * x);
  R[6] = s * (x * z - w * y);
  R[7] = s * (y * z + w * x);
  R[8] = T(1) - s * (x * x + y * y);
}

// Rows a, b of the stored precision entries (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz).
constexpr int kEntryRow[6] = {0, 0, 0, 1, 1, 2};
constexpr int kEntryCol[6] = {0, 1, 2, 1, 2, 2};

// P = R diag(1/s²) Rᵀ: voxelize.precision_entries, operation by operation.
template <typename T>
inline void precision_of(const T* s, const T* R, T* P) {
  T weighted[9];  // R_ac / s_c²
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < 3; ++c) weighted[3 * a + c] = R[3 * a + c] * (T(1) / (s[c] * s[c]));
  for (int e = 0; e < 6; ++e) {
    const T* t = weighted + 3 * kEntryRow[e];
    const T* r = R + 3 * kEntryCol[e];
    P[e] = (t[0] * r[0] + t[1] * r[1]) + t[2] * r[2];
  }
}

// Inclusive voxel box of the ellipsoid q <= k² around `mean`: k·sqrt(diag Σ) (voxelize.bounding_half_widths)
// in voxels, widened by `slack`, clamped to the grid; lo = (1, 1, 1), hi = (0, 0, 0) when not finite.
template <typename T>
inline void box_of(const T* mean, const T* s, const T* R, double k, double slack, const Grid& g, int32_t* lo,
                   int32_t* hi) {
  double centre[3], reach[3];
  bool finite = true;
  for (int a = 0; a < 3; ++a) {
    double var = 0;
    for (int c = 0; c < 3; ++c) {
      const double rs = static_cast<double>(R[3 * a + c]) * static_cast<double>(s[c]);
      var += rs * rs;
    }
    centre[a] = (static_cast<double>(mean[a]) - g.first[a]) / g.spacing[a];
    reach[a] = k * std::sqrt(var) / g.spacing[a];
    finite = finite && std::isfinite(centre[a]) && std::isfinite(reach[a]);
  }
  for (int a = 0; a < 3; ++a) {
    const double top = static_cast<double>(g.n[a]);  // clamped so that the integer casts are exact
    const int64_t first = ceil_index(std::max(-1.0, std::min(top, centre[a] - reach[a] - slack)));
    const int64_t last = floor_index(std::max(-1.0, std::min(top, centre[a] + reach[a] + slack)));
    lo[a] = static_cast<int32_t>(finite ? std::max<int64_t>(0, first) : 1);
    hi[a] = static_cast<int32_t>(std::max<int64_t>(finite ? std::min(g.n[a] - 1, last) : 0, lo[a] - 1));
  }
}

// Stable counting sort of `order` by keys[index] in [0, buckets).
void counting_sort(std::vector<int64_t>& order, int64_t buckets, const std::vector<int64_t>& keys) {
  std::vector<int64_t> start(buckets + 1, 0), sorted(order.size());
  for (const int64_t i : order) ++start[keys[i] + 1];
  for (int64_t b = 0; b < buckets; ++b) start[b + 1] += start[b];
  for (const int64_t i : order) sorted[start[keys[i]]++] = i;
  order.swap(sorted);
}

// ------------------------------------------------------------------ rows
// Row (y, z) of a Gaussian: the terms of q that are fixed along the row (q = row_mahalanobis(Pxx, dx, linear,
// constant)) and the inclusive column range [i0, i1] that may hold q <= k2 (i0 > i1 if none).
template <typename T>
struct Row {
  T linear, constant;
  int64_t i0, i1;
};

template <typename T>
CTRECON_PACK Row<T> row_of(const T* p, double inv_a, T dy, T dz, double k2, double mx, const Grid& g, int64_t lo,
                           int64_t hi) {
  Row<T> row{ctrecon::row_linear_term(p, dy, dz), ctrecon::row_constant_term(p, dy, dz), 1, 0};
  const double bb = static_cast<double>(row.linear), cc = static_cast<double>(row.constant);
  const double min_q = cc - bb * bb * inv_a;  // minimum of q over the row (continuous dx)
  if (!(min_q <= k2 * (1.0 + 1e-4) + 1e-12)) return row;
  if (hi - lo < Pack<T>::kLanes) {  // one pack covers the box row: no interval needed
    row.i0 = lo;
    row.i1 = hi;
    return row;
  }
  const double half = std::sqrt(std::max(0.0, (k2 - min_q) * inv_a));
  const double centre = mx - bb * inv_a;
  const double f0 = (centre - half - g.first[0]) / g.spacing[0], f1 = (centre + half - g.first[0]) / g.spacing[0];
  // Clamped to the grid (plus margin) so that the integer casts are exact floor/ceil; widened by one
  // voxel each side against rounding.
  const double lim = static_cast<double>(g.n[0]) + 2.0;
  row.i0 = std::max<int64_t>(lo, ceil_index(std::max(-lim, std::min(lim, f0))) - 1);
  row.i1 = std::min<int64_t>(hi, floor_index(std::max(-lim, std::min(lim, f1))) + 1);
  return row;
}

// Packs of row r from column r.i0: calls f(column, dx, keep, e) for each, keep = the lanes in [i0, i1] with
// q <= k2, e = exp(-q/2) (unmasked).
template <typename T, typename F>
CTRECON_PACK void for_each_pack(const Row<T>& r, const T* xs, T pxx, T mx, double k2, F&& f) {
  using P = Pack<T>;
  const typename P::ivec lanes = lane_index<T>();
  const P k2s(static_cast<T>(k2)), linear(r.linear), constant(r.constant), a(pxx), m(mx), minus_half(T(-0.5));
  for (int64_t c = r.i0; c <= r.i1; c += P::kLanes) {
    const P dx = P::load(xs + c) - m;
    const P q = ctrecon::row_mahalanobis(a, dx, linear, constant);
    const typename P::ivec keep = (q.v <= k2s.v) & (lanes <= static_cast<typename P::Int>(r.i1 - c));
    f(c, dx, keep, exp_lanes(minus_half * q));
  }
}

// ------------------------------------------------------------------ forward
constexpr int64_t kSlab = 4;  // (b, z) slices per forward task, fewer where that leaves < 4 tasks a thread

// Slices [z0, z1) of item b into `slab` ([z1 - z0, Y, stride], zeroed), sorted Gaussians n in [n0, n1) of the item.
template <typename T>
CTRECON_PACK void render_slab_body(const Problem<T>& pr, int64_t b, int64_t z0, int64_t z1, int64_t n0, int64_t n1,
                                   T* slab) {
  using P = Pack<T>;
  const Grid& g = pr.grid;
  for (int64_t n = n0; n < n1; ++n) {
    const Record<T>& rec = pr.records[b * pr.N + n];
    const int32_t *l = rec.lo, *h = rec.hi;
    const int64_t za = std::max<int64_t>(z0, l[2]), zb = std::min<int64_t>(z1 - 1, h[2]);
    if (za > zb || l[0] > h[0] || l[1] > h[1]) continue;
    const T mx = rec.mean[0], my = rec.mean[1], mz = rec.mean[2];
    const T* p = rec.prec;
    const double inv_a = 1.0 / static_cast<double>(p[0]);
    const P inten(rec.intensity);
    for (int64_t z = za; z <= zb; ++z) {
      const T dz = pr.zs[z] - mz;
      T* plane = slab + (z - z0) * g.n[1] * g.stride;
      for (int64_t y = l[1]; y <= h[1]; ++y) {
        const Row<T> r = row_of(p, inv_a, pr.ys[y] - my, dz, pr.k2, static_cast<double>(mx), g, l[0], h[0]);
        T* row = plane + y * g.stride;
        for_each_pack(r, pr.xs, p[0], mx, pr.k2, [&](int64_t c, P, typename P::ivec keep, P e) {
          (P::load(row + c) + (inten * e).masked(keep)).store(row + c);
        });
      }
    }
  }
}

template <typename T>
void render_slab(const Problem<T>& pr, int64_t b, int64_t z0, int64_t z1, int64_t n0, int64_t n1, T* slab) {
  render_slab_body(pr, b, z0, z1, n0, n1, slab);
}

#ifdef CTRECON_VOXELIZE_AVX2
template <typename T>
__attribute__((target("avx2"))) void render_slab_avx2(const Problem<T>& pr, int64_t b, int64_t z0, int64_t z1,
                                                       int64_t n0, int64_t n1, T* slab) {
  render_slab_body(pr, b, z0, z1, n0, n1, slab);
}
#endif

template <typename T>
void forward_kernel(const Problem<T>& pr, T* out) {
  const Grid& g = pr.grid;
  const int64_t B = pr.B, N = pr.N, Z = g.n[2], Y = g.n[1], X = g.n[0];
  // A slab [z0, z1) only scans the sorted window lo_z in [z0 - depth, z1), found by binary search.
  std::vector<int64_t> depth(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      const Record<T>& rec = pr.records[b * N + n];
      depth[b] = std::max<int64_t>(depth[b], rec.hi[2] - rec.lo[2]);
    }
  auto first_with_lo_z = [&](int64_t b, int64_t z) {  // first n of item b with lo_z >= z
    int64_t a = 0, e = N;
    while (a < e) {
      const int64_t mid = (a + e) / 2;
      if (pr.records[b * N + mid].lo[2] < z) a = mid + 1; else e = mid;
    }
    return a;
  };
  auto render = render_slab<T>;
#ifdef CTRECON_VOXELIZE_AVX2
  if (use_avx2()) render = render_slab_avx2<T>;
#endif
  const int64_t thickness = std::max<int64_t>(1, std::min<int64_t>(kSlab, B * Z / (4 * at::get_num_threads())));
  const int64_t slabs = (Z + thickness - 1) / thickness, tasks = B * slabs;
#pragma omp parallel
  {
    std::vector<T> slab(thickness * Y * g.stride);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / slabs, z0 = (task % slabs) * thickness, z1 = std::min(Z, z0 + thickness);
      std::fill(slab.begin(), slab.end(), T(0));
      render(pr, b, z0, z1, first_with_lo_z(b, z0 - depth[b]), first_with_lo_z(b, z1), slab.data());
      for (int64_t z = z0; z < z1; ++z)
        for (int64_t y = 0; y < Y; ++y)
          std::memcpy(out + ((b * Z + z) * Y + y) * X, slab.data() + ((z - z0) * Y + y) * g.stride, X * sizeof(T));
    }
  }
}

// ------------------------------------------------------------------ backward
// Rows of the upstream gradient [B, Z, Y, X] for packs: a pack reads up to lanes - 1 values past its row's end,
// harmless (masked) except past the end of the tensor, so the rows that reach there are read from a zero-padded
// copy of the tensor's tail.
template <typename T>
struct GradientRows {
  const T* data;
  int64_t tail_start;  // rows starting at or after this flat index are read from `tail`
  std::vector<T> tail;

  GradientRows(const T* grad, int64_t total, int64_t X) : data(grad) {
    tail_start = std::max<int64_t>(0, total - X - Pack<T>::kLanes);
    tail.assign(grad + tail_start, grad + total);
    tail.resize(total - tail_start + Pack<T>::kLanes, T(0));
  }
  CTRECON_PACK const T* row(int64_t flat) const {
    return flat < tail_start ? data + flat : tail.data() + (flat - tail_start);
  }
};

// Moments of sorted Gaussians [g0, g1), written to row order[gi] of `moments` [G, 10].
template <typename T>
CTRECON_PACK void moments_body(const Problem<T>& pr, const GradientRows<T>& grad, int64_t g0, int64_t g1,
                               T* moments) {
  using P = Pack<T>;
  const Grid& g = pr.grid;
  for (int64_t gi = g0; gi < g1; ++gi) {
    const Record<T>& rec = pr.records[gi];
    const int32_t *l = rec.lo, *h = rec.hi;
    P m[ctrecon::kMoments];
    for (auto& v : m) v = P(T(0));
    const T mx = rec.mean[0], my = rec.mean[1], mz = rec.mean[2];
    const T* p = rec.prec;
    const double inv_a = 1.0 / static_cast<double>(p[0]);
    const int64_t item = (gi / pr.N) * g.n[2];
    if (l[0] <= h[0] && l[1] <= h[1]) {
      for (int64_t z = l[2]; z <= h[2]; ++z) {
        const T dz = pr.zs[z] - mz;
        const P dzs(dz);
        for (int64_t y = l[1]; y <= h[1]; ++y) {
          const T dy = pr.ys[y] - my;
          const P dys(dy);
          const Row<T> r = row_of(p, inv_a, dy, dz, pr.k2, static_cast<double>(mx), g, l[0], h[0]);
          const T* row = grad.row(((item + z) * g.n[1] + y) * g.n[0]);
          for_each_pack(r, pr.xs, p[0], mx, pr.k2, [&](int64_t c, P dx, typename P::ivec keep, P e) {
            const P w = (P::load(row + c) * e).masked(keep);
            const P wx = w * dx, wy = w * dys, wz = w * dzs;
            m[0] += w;
            m[1] += wx;
            m[2] += wy;
            m[3] += wz;
            m[4] += wx * dx;
            m[5] += wx * dys;
            m[6] += wx * dzs;
            m[7] += wy * dys;
            m[8] += wy * dzs;
            m[9] += wz * dzs;
          });
        }
      }
    }
    T* target = moments + ctrecon::kMoments * pr.order[gi];
    for (int c = 0; c < ctrecon::kMoments; ++c) target[c] = m[c].sum();
  }
}

template <typename T>
void moments_block(const Problem<T>& pr, const GradientRows<T>& grad, int64_t g0, int64_t g1, T* moments) {
  moments_body(pr, grad, g0, g1, moments);
}

#ifdef CTRECON_VOXELIZE_AVX2
template <typename T>
__attribute__((target("avx2"))) void moments_block_avx2(const Problem<T>& pr, const GradientRows<T>& grad,
                                                         int64_t g0, int64_t g1, T* moments) {
  moments_body(pr, grad, g0, g1, moments);
}
#endif

constexpr int64_t kBackwardBlock = 64;  // Gaussians per backward task

template <typename T>
void moments_kernel(const Problem<T>& pr, const T* grad_out, T* moments) {
  const Grid& g = pr.grid;
  const int64_t G = pr.B * pr.N;
  const GradientRows<T> grad(grad_out, pr.B * g.n[2] * g.n[1] * g.n[0], g.n[0]);
  auto block = moments_block<T>;
#ifdef CTRECON_VOXELIZE_AVX2
  if (use_avx2()) block = moments_block_avx2<T>;
#endif
  const int64_t blocks = (G + kBackwardBlock - 1) / kBackwardBlock;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t k = 0; k < blocks; ++k)
    block(pr, grad, k * kBackwardBlock, std::min(G, (k + 1) * kBackwardBlock), moments);
}

// ------------------------------------------------------------------ precision backward
// Gradients of the scales and the raw quaternion from the gradient gP of the stored entries of
// P = R(q / |q|) diag(v) Rᵀ, v = 1/s² (in double): with M the symmetric matrix of gP (off-diagonal entries
// halved, each appears twice in P), ∂/∂v_c = (Rᵀ M R)_cc, ∂/∂R = 2 M R diag(v), then through R(q̂) and
// q̂ = q/|q|.
template <typename T>
void precision_backward_one(const T* scales, const T* quat, const T* grad_prec, T* grad_scales, T* grad_quat) {
  const double raw[4] = {double(quat[0]), double(quat[1]), double(quat[2]), double(quat[3])};
  double R[9], q[4], M[9] = {0};
  rotation_of(raw, R);
  const double norm = std::sqrt(((raw[0] * raw[0] + raw[1] * raw[1]) + raw[2] * raw[2]) + raw[3] * raw[3]);
  for (int i = 0; i < 4; ++i) q[i] = raw[i] / norm;
  const double w = q[0], x = q[1], y = q[2], z = q[3];
  for (int e = 0; e < 6; ++e) {
    const int a = kEntryRow[e], b = kEntryCol[e];
    const double value = a == b ? grad_prec[e] : 0.5 * grad_prec[e];
    M[3 * a + b] += value;
    if (a != b) M[3 * b + a] += value;
  }
  double v[3], MR[9] = {0};
  for (int c = 0; c < 3; ++c) v[c] = 1.0 / (double(scales[c]) * scales[c]);
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < 3; ++c)
      for (int b = 0; b < 3; ++b) MR[3 * a + c] += M[3 * a + b] * R[3 * b + c];
  double gR[9];
  for (int c = 0; c < 3; ++c) {
    double dv = 0;
    for (int a = 0; a < 3; ++a) {
      dv += R[3 * a + c] * MR[3 * a + c];
      gR[3 * a + c] = 2 * MR[3 * a + c] * v[c];
    }
    grad_scales[c] = static_cast<T>(-2.0 * dv * v[c] / scales[c]);  // dv/ds = -2/s³
  }
  // ∂R/∂(w, x, y, z) of the unit quaternion's entries (those of rotation_of with |q| = 1).
  const double gw = 2 * (-z * gR[1] + y * gR[2] + z * gR[3] - x * gR[5] - y * gR[6] + x * gR[7]);
  const double gx = 2 * (y * gR[1] + z * gR[2] + y * gR[3] - 2 * x * gR[4] - w * gR[5] + z * gR[6] + w * gR[7] -
                         2 * x * gR[8]);
  const double gy = 2 * (-2 * y * gR[0] + x * gR[1] + w * gR[2] + x * gR[3] + z * gR[5] - w * gR[6] + z * gR[7] -
                         2 * y * gR[8]);
  const double gz = 2 * (-2 * z * gR[0] - w * gR[1] + x * gR[2] + w * gR[3] - 2 * z * gR[4] + y * gR[5] +
                         x * gR[6] + y * gR[7]);
  const double gq[4] = {gw, gx, gy, gz};
  const double along = w * gw + x * gx + y * gy + z * gz;
  for (int i = 0; i < 4; ++i) grad_quat[i] = static_cast<T>((gq[i] - q[i] * along) / norm);
}

template <typename T>
void precision_backward_all(const T* scales, const T* quats, const T* grad_prec, int64_t G, T* grad_scales,
                            T* grad_quats) {
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < G; ++gi)
    precision_backward_one(scales + 3 * gi, quats + 4 * gi, grad_prec + 6 * gi, grad_scales + 3 * gi,
                           grad_quats + 4 * gi);
}

// ------------------------------------------------------------------ bindings
void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void use_torch_threads() {
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
}

template <typename T>
Problem<T> problem(const torch::Tensor& records, const torch::Tensor& order, const torch::Tensor& xs,
                   const torch::Tensor& ys, const torch::Tensor& zs, const Grid& grid, int64_t B, double k2,
                   std::vector<T>& xs_padded) {
  const int64_t G = order.size(0);
  TORCH_CHECK(B > 0 && G % B == 0, "Gaussian count must be a multiple of the batch size");
  TORCH_CHECK(records.dim() == 2 && records.size(0) == G && records.size(1) == int64_t(sizeof(Record<T>)),
              "records must be [G, ", sizeof(Record<T>), "] bytes of this dtype");
  const T* x = xs.data_ptr<T>();
  xs_padded.assign(x, x + grid.n[0]);
  xs_padded.resize(grid.stride, grid.n[0] > 0 ? x[grid.n[0] - 1] : T(0));
  return Problem<T>{reinterpret_cast<const Record<T>*>(records.data_ptr<uint8_t>()), order.data_ptr<int64_t>(),
                    xs_padded.data(), ys.data_ptr<T>(), zs.data_ptr<T>(), B, G / B, grid, k2};
}

// Set-up of the forward (see the file comment): prec [G, 6] in the caller's order, and the records in the order
// of the boxes' starts (item, lo_z, lo_y, lo_x) with `order`, the caller's index of each.
template <typename T>
void set_up(const T* means, const T* scales, const T* quats, const T* intens, int64_t B, int64_t G, const Grid& grid,
            double k, double slack, T* prec, Record<T>* records, int64_t* order) {
  // Sort keys (lo_y, lo_x) and (item, lo_z); an empty box may start one past the grid.
  const int64_t X1 = grid.n[0] + 1, Y1 = grid.n[1] + 1, Z1 = grid.n[2] + 1, N = G / B;
  std::vector<int32_t> boxes(6 * G);
  std::vector<int64_t> row_key(G), slice_key(G);
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < G; ++gi) {
    T R[9];
    int32_t* lo = boxes.data() + 6 * gi;
    rotation_of(quats + 4 * gi, R);
    precision_of(scales + 3 * gi, R, prec + 6 * gi);
    box_of(means + 3 * gi, scales + 3 * gi, R, k, slack, grid, lo, lo + 3);
    row_key[gi] = std::min<int64_t>(lo[1], grid.n[1]) * X1 + std::min<int64_t>(lo[0], grid.n[0]);
    slice_key[gi] = (gi / N) * Z1 + std::min<int64_t>(lo[2], grid.n[2]);
  }
  std::vector<int64_t> sequence(G);
  for (int64_t gi = 0; gi < G; ++gi) sequence[gi] = gi;
  counting_sort(sequence, Y1 * X1, row_key);
  counting_sort(sequence, B * Z1, slice_key);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < G; ++j) {
    const int64_t gi = sequence[j];
    Record<T>& rec = records[j];
    order[j] = gi;
    std::copy(means + 3 * gi, means + 3 * gi + 3, rec.mean);
    std::copy(prec + 6 * gi, prec + 6 * gi + 6, rec.prec);
    rec.intensity = intens[gi];
    std::copy(boxes.data() + 6 * gi, boxes.data() + 6 * gi + 3, rec.lo);
    std::copy(boxes.data() + 6 * gi + 3, boxes.data() + 6 * gi + 6, rec.hi);
  }
}

// out [B, Z, Y, X] and what the backward needs: prec [G, 6] in the caller's order, the sorted records (bytes) and
// their order.
std::vector<torch::Tensor> voxelize_forward(torch::Tensor means, torch::Tensor scales, torch::Tensor quats,
                                            torch::Tensor intens, torch::Tensor xs, torch::Tensor ys, torch::Tensor zs,
                                            std::vector<double> first, std::vector<double> spacing, int64_t B,
                                            double k, double slack) {
  for (auto* t : {&means, &scales, &quats, &intens, &xs, &ys, &zs}) check(*t, "input");
  const int64_t G = means.size(0);
  TORCH_CHECK(B > 0 && G % B == 0, "Gaussian count must be a multiple of the batch size");
  auto out = torch::empty({B, zs.size(0), ys.size(0), xs.size(0)}, means.options());
  auto prec = torch::empty({G, 6}, means.options());
  auto order = torch::empty({G}, means.options().dtype(torch::kInt64));
  torch::Tensor records;
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "voxelize_forward", [&] {
    const Grid grid = make_grid(xs, ys, zs, first, spacing, Pack<scalar_t>::kLanes);
    records = torch::empty({G, int64_t(sizeof(Record<scalar_t>))}, means.options().dtype(torch::kUInt8));
    set_up(means.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(),
           intens.data_ptr<scalar_t>(), B, G, grid, k, slack, prec.data_ptr<scalar_t>(),
           reinterpret_cast<Record<scalar_t>*>(records.data_ptr<uint8_t>()), order.data_ptr<int64_t>());
    std::vector<scalar_t> xs_padded;
    forward_kernel(problem<scalar_t>(records, order, xs, ys, zs, grid, B, k * k, xs_padded),
                   out.data_ptr<scalar_t>());
  });
  return {out, prec, records, order};
}

// Moments [G, 10] in the caller's order, from the records and order of voxelize_forward.
torch::Tensor voxelize_moments(torch::Tensor grad_out, torch::Tensor records, torch::Tensor order, torch::Tensor xs,
                               torch::Tensor ys, torch::Tensor zs, std::vector<double> first,
                               std::vector<double> spacing, int64_t B, double k) {
  for (auto* t : {&grad_out, &records, &order, &xs, &ys, &zs}) check(*t, "input");
  TORCH_CHECK(grad_out.numel() == B * zs.size(0) * ys.size(0) * xs.size(0), "grad_out must be [B, Z, Y, X]");
  auto moments = torch::empty({order.size(0), ctrecon::kMoments}, grad_out.options());
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "voxelize_moments", [&] {
    const Grid grid = make_grid(xs, ys, zs, first, spacing, Pack<scalar_t>::kLanes);
    std::vector<scalar_t> xs_padded;
    moments_kernel(problem<scalar_t>(records, order, xs, ys, zs, grid, B, k * k, xs_padded),
                   grad_out.data_ptr<scalar_t>(), moments.data_ptr<scalar_t>());
  });
  return moments;
}

// (grad scales [G, 3], grad quats [G, 4]) from grad prec [G, 6].
std::vector<torch::Tensor> precision_backward(torch::Tensor scales, torch::Tensor quats, torch::Tensor grad_prec) {
  for (auto* t : {&scales, &quats, &grad_prec}) check(*t, "input");
  auto grad_scales = torch::empty_like(scales), grad_quats = torch::empty_like(quats);
  const int64_t G = scales.size(0);
  use_torch_threads();
  AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "precision_backward", [&] {
    precision_backward_all(scales.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), grad_prec.data_ptr<scalar_t>(),
                           G, grad_scales.data_ptr<scalar_t>(), grad_quats.data_ptr<scalar_t>());
  });
  return {grad_scales, grad_quats};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &voxelize_forward, "Gaussian voxelizer forward with its set-up (CPU)");
  m.def("moments", &voxelize_moments, "Gaussian voxelizer backward moments (CPU)");
  m.def("precision_backward", &precision_backward, "Gradient of the precision entries to scales and quaternions");
}
