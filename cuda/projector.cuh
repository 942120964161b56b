// Joseph cone-beam projector: the per-ray code of the operator documented in ctrecon/operators/projector.py
// (its module docstring is the contract; its torch reference is the oracle):
//   * coordinates are continuous voxel indices (x, y, z) = (i, j, k); per view 12 doubles give the
//     source S, the centre D0 of pixel (0, 0) and the steps Du, Dv per detector column / row;
//   * ray (r, c) has direction d = ((D0 + c·Du) + r·Dv) - S (float64, this order), dominant axis m =
//     argmax |d| (ties x, then y, then z), in-plane axes (p, q) = (y, z), (x, z) or (x, y);
//   * slice s = 0 … N_m-1 is sampled at P_s = (S_p - S_m·d_p/d_m) + s·d_p/d_m (same for Q) by bilinear
//     interpolation with voxels outside the volume read as zero;
//   * (A x)(ray) = L·Σ_s sample_s with L = ‖d ⊙ spacing‖ / |d_m| mm, and Aᵀ scatters y·L with the
//     same four bilinear weights (the exact transpose).
// The ray set-up (trace_ray: dominant axis, slopes, slice range, L) is the one copy used by every compiled
// path: the CUDA kernels (projector.cu), the compiled CPU projector (ctrecon/operators/csrc/projector.cpp,
// which includes this header as host code) and the CPU emulation of the kernels (tests/cuda_emulation.cpp).
// It runs in float64 with correctly rounded operations, so the discrete choices agree with the float64
// reference. The CUDA stepping below (Ray, footprint, ray_integral, ray_scatter) then runs in float32 with
// explicit zero-border tests; the CPU path steps its own way (double or AVX2, on a zero-padded copy).
#pragma once

#include "common.cuh"

namespace ctrecon {

constexpr int kViewFields = 12;

// Voxel counts and sizes (mm) along (x, y, z) of a [Z, Y, X] volume.
struct ProjectorGrid {
  int64_t n[3];
  double spacing[3];
};

// A ray's float64 set-up: slices [begin, end) along the dominant axis m can hold a nonzero sample; at slice s
// the in-plane coordinates (shifted by trace_ray's origin) are p0 + s·dp and q0 + s·dq.
struct RayPath {
  int m, p, q;            // dominant axis and in-plane axes (0 = x, 1 = y, 2 = z)
  double p0, dp, q0, dq;  // in-plane coordinates at slice 0 and their steps per slice
  double length;          // mm between consecutive slices
  int64_t np, nq;         // voxel counts along p and q
  int64_t begin, end;
};

// Narrow [begin, end) to the slices s with lo < c0 + s·dc < hi (float64; the samples outside that open
// interval read only zero-border voxels).
CTRECON_HD void clip_slices(double c0, double dc, double lo, double hi, int64_t& begin, int64_t& end) {
  if (dc == 0.0) {
    if (!(c0 > lo && c0 < hi)) end = begin;
    return;
  }
  double a = (lo - c0) / dc, b = (hi - c0) / dc;
  if (a > b) {
    const double t = a;
    a = b;
    b = t;
  }
  const double limit = static_cast<double>(end) + 1.0;  // keeps the casts below in range
  a = min_of(max_of(a, -2.0), limit);
  b = min_of(max_of(b, -2.0), limit);
  begin = max_of(begin, static_cast<int64_t>(floor(a)) + 1);
  end = min_of(end, static_cast<int64_t>(ceil(b)));
}

// Component `axis` (0 = x, 1 = y, 2 = z) of (x, y, z), without an indexed local array (which the GPU
// would place in local memory).
template <typename T>
CTRECON_HD T component(int axis, T x, T y, T z) {
  return axis == 0 ? x : (axis == 1 ? y : z);
}

// Set up the ray of detector pixel (row, col) of a view (view = (S, D0, Du, Dv), 3 doubles each) in
// coordinates shifted by `origin` (0: voxel indices; 1: indices of a grid padded by one voxel on every side);
// false when none of its samples can be nonzero.
CTRECON_HD bool trace_ray(const double* view, int64_t row, int64_t col, const ProjectorGrid& g, double origin,
                          RayPath& ray) {
  const double c = static_cast<double>(col), r = static_cast<double>(row);
  // d = ((D0 + c·Du) + r·Dv) - S
  const double dx = sub_rn(add_rn(add_rn(view[3], mul_rn(c, view[6])), mul_rn(r, view[9])), view[0]);
  const double dy = sub_rn(add_rn(add_rn(view[4], mul_rn(c, view[7])), mul_rn(r, view[10])), view[1]);
  const double dz = sub_rn(add_rn(add_rn(view[5], mul_rn(c, view[8])), mul_rn(r, view[11])), view[2]);
  const double ax = fabs(dx), ay = fabs(dy), az = fabs(dz);
  const int m = (ax >= ay && ax >= az) ? 0 : (ay >= az ? 1 : 2);
  const int p = (m == 0) ? 1 : 0;
  const int q = (m == 2) ? 1 : 2;
  const double d_m = component(m, dx, dy, dz), d_p = component(p, dx, dy, dz), d_q = component(q, dx, dy, dz);
  const double s_m = component(m, view[0], view[1], view[2]);
  ray.m = m;
  ray.p = p;
  ray.q = q;
  ray.dp = d_p / d_m;
  ray.dq = d_q / d_m;
  ray.p0 = add_rn(sub_rn(component(p, view[0], view[1], view[2]), mul_rn(s_m, ray.dp)), origin);
  ray.q0 = add_rn(sub_rn(component(q, view[0], view[1], view[2]), mul_rn(s_m, ray.dq)), origin);
  const double wx = dx * g.spacing[0], wy = dy * g.spacing[1], wz = dz * g.spacing[2];
  ray.length = sqrt(wx * wx + wy * wy + wz * wz) / fabs(d_m);
  ray.np = component(p, g.n[0], g.n[1], g.n[2]);
  ray.nq = component(q, g.n[0], g.n[1], g.n[2]);
  ray.begin = 0;
  ray.end = component(m, g.n[0], g.n[1], g.n[2]);
  clip_slices(ray.p0, ray.dp, origin - 1.0, static_cast<double>(ray.np) + origin, ray.begin, ray.end);
  clip_slices(ray.q0, ray.dq, origin - 1.0, static_cast<double>(ray.nq) + origin, ray.begin, ray.end);
  return ray.begin < ray.end;
}

// A ray ready to be stepped by the CUDA kernels: at slice s the in-plane coordinates are P = p0 + s·dp,
// Q = q0 + s·dq (float32, fused multiply-add); slices [begin, end) can be nonzero.
struct Ray {
  float p0, dp, q0, dq;
  float length;  // mm between consecutive slices
  int64_t begin, end;
  int64_t stride_m, stride_p, stride_q;  // element strides of the [Z, Y, X] layout
  int64_t np, nq;                        // voxel counts along p and q
};

// Set up the ray of detector pixel (row, col) of a view; false when none of its samples can be nonzero.
CTRECON_HD bool setup_ray(const double* view, int64_t row, int64_t col, const ProjectorGrid& g, Ray& ray) {
  RayPath path;
  const bool hits = trace_ray(view, row, col, g, 0.0, path);
  ray.p0 = static_cast<float>(path.p0);
  ray.dp = static_cast<float>(path.dp);
  ray.q0 = static_cast<float>(path.q0);
  ray.dq = static_cast<float>(path.dq);
  ray.length = static_cast<float>(path.length);
  const int64_t plane = g.n[0] * g.n[1];
  ray.stride_m = component<int64_t>(path.m, 1, g.n[0], plane);
  ray.stride_p = component<int64_t>(path.p, 1, g.n[0], plane);
  ray.stride_q = component<int64_t>(path.q, 1, g.n[0], plane);
  ray.np = path.np;
  ray.nq = path.nq;
  ray.begin = path.begin;
  ray.end = path.end;
  return hits;
}

// Bilinear footprint of slice s: the lower corner (ip, iq), its element offset, and the fractions.
struct Footprint {
  int64_t ip, iq, offset;
  float fp, fq;
};

CTRECON_HD Footprint footprint(const Ray& ray, int64_t s) {
  const float sf = static_cast<float>(s);
  const float P = fmaf(sf, ray.dp, ray.p0), Q = fmaf(sf, ray.dq, ray.q0);
  const float lp = floorf(P), lq = floorf(Q);
  Footprint f;
  f.ip = static_cast<int64_t>(lp);
  f.iq = static_cast<int64_t>(lq);
  f.fp = P - lp;
  f.fq = Q - lq;
  f.offset = s * ray.stride_m + f.ip * ray.stride_p + f.iq * ray.stride_q;
  return f;
}

// Whether index i lies in [0, n): a corner outside the volume reads zero (and is not written).
CTRECON_HD bool inside(int64_t i, int64_t n) { return i >= 0 && i < n; }

// Σ_s L·bilinear(volume[slice s], P_s, Q_s) over the ray's slices: one detector pixel of A x.
CTRECON_HD float ray_integral(const float* volume, const Ray& ray) {
  const int64_t sp = ray.stride_p, sq = ray.stride_q;
  float sum = 0.0f;
  for (int64_t s = ray.begin; s < ray.end; ++s) {
    const Footprint f = footprint(ray, s);
    const bool p_lo = inside(f.ip, ray.np), p_hi = inside(f.ip + 1, ray.np);
    const bool q_lo = inside(f.iq, ray.nq), q_hi = inside(f.iq + 1, ray.nq);
    const float* v = volume + f.offset;
    const float v00 = (p_lo && q_lo) ? read_only(v) : 0.0f;
    const float v10 = (p_hi && q_lo) ? read_only(v + sp) : 0.0f;
    const float v01 = (p_lo && q_hi) ? read_only(v + sq) : 0.0f;
    const float v11 = (p_hi && q_hi) ? read_only(v + sp + sq) : 0.0f;
    const float lower = v00 + f.fp * (v10 - v00);
    const float upper = v01 + f.fp * (v11 - v01);
    sum += lower + f.fq * (upper - lower);
  }
  return sum * ray.length;
}

// Adds value·L·(bilinear weights) of every slice of the ray to the volume: one detector pixel of Aᵀ y.
CTRECON_HD void ray_scatter(float* volume, const Ray& ray, float value) {
  const int64_t sp = ray.stride_p, sq = ray.stride_q;
  const float weighted = value * ray.length;
  for (int64_t s = ray.begin; s < ray.end; ++s) {
    const Footprint f = footprint(ray, s);
    const bool p_lo = inside(f.ip, ray.np), p_hi = inside(f.ip + 1, ray.np);
    const bool q_lo = inside(f.iq, ray.nq), q_hi = inside(f.iq + 1, ray.nq);
    float* v = volume + f.offset;
    const float lower = weighted * (1.0f - f.fq), upper = weighted * f.fq;
    if (p_lo && q_lo) accumulate(v, lower * (1.0f - f.fp));
    if (p_hi && q_lo) accumulate(v + sp, lower * f.fp);
    if (p_lo && q_hi) accumulate(v + sq, upper * (1.0f - f.fp));
    if (p_hi && q_hi) accumulate(v + sp + sq, upper * f.fp);
  }
}

}  // namespace ctrecon
