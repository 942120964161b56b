// Gaussian voxelizer: the per-thread pieces shared by the kernels of voxelize.cu and the CPU emulation, and the
// evaluation of q that the compiled CPU voxelizer (ctrecon/operators/csrc/voxelize_cpu.cpp) includes too.
//
// Semantics are those of ctrecon/operators/voxelize.py (its docstring is the contract): a site (voxel centre
// or query point) at p gets Σ_g I_g·exp(-q_g/2) over the Gaussians g whose integer box contains the site's
// lattice cell and with q_g = dᵀ P_g d <= k², d = p - μ_g, q evaluated in the documented order with one
// rounding per operation (mul_rn / add_rn), so the inclusion test agrees with the reference exactly.
//
// Sites live on an integer lattice: for dense grids the lattice is the voxel grid (a site's cell is its
// voxel index and the boxes are the reference's voxel boxes); for query points it is the reference's
// uniform grid of cells (voxelize._PointPairs: a point's cell and a Gaussian's cell box, so the
// (Gaussian, point) pairs are exactly the reference's). The lattice is cut into tiles of
// tile[0]×tile[1]×tile[2] cells; a dense tile holds exactly kVoxelizeBlock voxels (one per thread).
//
// Binning (gsplat-style): every Gaussian counts the tiles its box overlaps; one thread per
// (Gaussian, tile) pair writes the key item·tiles_per_item + tile and the Gaussian's id (pairs come out in
// Gaussian order, so a stable sort by key leaves each tile's list in increasing Gaussian order and the
// sums deterministic).
#pragma once

#include "common.cuh"

namespace ctrecon {

constexpr int kVoxelizeBlock = 256;  // threads per tile block
constexpr int kMoments = 10;         // Σ w·(1, dx, dy, dz, dx², dxdy, dxdz, dy², dydz, dz²)

struct Lattice {
  int32_t n[3];      // cells along x, y, z
  int32_t tile[3];   // cells per tile along x, y, z
  int32_t tiles[3];  // tiles along x, y, z: ceil(n / tile)
  int64_t tiles_per_item;
  int64_t gaussians_per_item;  // Gaussian g belongs to batch item g / gaussians_per_item
};

CTRECON_HD Lattice make_lattice(const int32_t* n, const int32_t* tile, int64_t gaussians_per_item) {
  Lattice lattice;
  lattice.tiles_per_item = 1;
  for (int a = 0; a < 3; ++a) {
    lattice.n[a] = n[a];
    lattice.tile[a] = tile[a];
    lattice.tiles[a] = (n[a] + tile[a] - 1) / tile[a];
    lattice.tiles_per_item *= lattice.tiles[a];
  }
  lattice.gaussians_per_item = gaussians_per_item;
  return lattice;
}

// Inclusive cell ranges [lo, hi] (x, y, z) per Gaussian, [G, 3] each, with 0 <= lo and hi <= n - 1
// whenever lo <= hi on every axis; a box with some hi < lo is empty.
struct Boxes {
  const int32_t* lo;
  const int32_t* hi;
};

struct Gaussians {
  const float* means;        // [G, 3] (x, y, z)
  const float* prec;         // [G, 6] (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz)
  const float* intensities;  // [G]
  Boxes boxes;
};

// Gaussian ids grouped by tile key; the list of key t is ids[ends[t-1] .. ends[t]) (ends[-1] = 0).
struct TileLists {
  const int32_t* ids;
  const int64_t* ends;
};

// Dense grid [B, Z, Y, X]: the lattice is the voxel grid; xs, ys, zs are the voxel-centre coordinates.
struct DenseSites {
  Lattice lattice;
  const float* xs;
  const float* ys;
  const float* zs;
};

// Query points [B·M, 3] with their lattice cells [B·M, 3]; order lists the point rows grouped by tile key,
// the points of key t being order[ends[t-1] .. ends[t]).
struct PointSites {
  Lattice lattice;
  const float* points;
  const int32_t* cells;
  const int64_t* order;
  const int64_t* ends;
};

// One site handled by a thread: its position (mm) and lattice cell.
struct Site {
  float pos[3];
  int32_t cell[3];
};

// A Gaussian as staged in shared memory.
struct GaussianRecord {
  float mean[3];
  float prec[6];
  float intensity;
  int32_t lo[3];
  int32_t hi[3];
};

CTRECON_HD int64_t list_begin(const int64_t* ends, int64_t key) { return key > 0 ? ends[key - 1] : 0; }

CTRECON_HD int64_t tile_key(int64_t item, int64_t tx, int64_t ty, int64_t tz, const Lattice& lattice) {
  return item * lattice.tiles_per_item + (tz * lattice.tiles[1] + ty) * lattice.tiles[0] + tx;
}

// Key of the tile holding lattice cell `cell` of batch item `item`.
CTRECON_HD int64_t cell_tile_key(int64_t item, const int32_t* cell, const Lattice& lattice) {
  return tile_key(item, cell[0] / lattice.tile[0], cell[1] / lattice.tile[1], cell[2] / lattice.tile[2], lattice);
}

// Number of tiles that Gaussian g's box overlaps (0 for an empty box).
CTRECON_HD int64_t tile_count(const Boxes& boxes, int64_t g, const Lattice& lattice) {
  int64_t count = 1;
  for (int a = 0; a < 3; ++a) {
    const int32_t lo = boxes.lo[3 * g + a], hi = boxes.hi[3 * g + a];
    if (hi < lo) return 0;
    count *= hi / lattice.tile[a] - lo / lattice.tile[a] + 1;
  }
  return count;
}

// Pair `pair` of the concatenated per-Gaussian tile ranges (ends = inclusive prefix sums of tile_count):
// its Gaussian (binary search) and the key of its tile, enumerated x fastest within the Gaussian's box.
CTRECON_HD int64_t pair_tile_key(const Boxes& boxes, const int64_t* ends, int64_t n_gaussians, int64_t pair,
                                 const Lattice& lattice, int64_t& gaussian) {
  int64_t lo = 0, hi = n_gaussians - 1;
  while (lo < hi) {  // first g with ends[g] > pair
    const int64_t mid = lo + (hi - lo) / 2;
    if (ends[mid] > pair) hi = mid; else lo = mid + 1;
  }
  const int64_t g = lo;
  int64_t local = pair - list_begin(ends, g);
  int64_t first[3], span[3];
  for (int a = 0; a < 3; ++a) {
    first[a] = boxes.lo[3 * g + a] / lattice.tile[a];
    span[a] = boxes.hi[3 * g + a] / lattice.tile[a] - first[a] + 1;
  }
  const int64_t tx = first[0] + local % span[0];
  local /= span[0];
  const int64_t ty = first[1] + local % span[1];
  const int64_t tz = first[2] + local / span[1];
  gaussian = g;
  return tile_key(g / lattice.gaussians_per_item, tx, ty, tz, lattice);
}

CTRECON_HD GaussianRecord load_gaussian(const Gaussians& gaussians, int64_t g) {
  GaussianRecord r;
  for (int a = 0; a < 3; ++a) {
    r.mean[a] = gaussians.means[3 * g + a];
    r.lo[a] = gaussians.boxes.lo[3 * g + a];
    r.hi[a] = gaussians.boxes.hi[3 * g + a];
  }
  for (int e = 0; e < 6; ++e) r.prec[e] = gaussians.prec[6 * g + e];
  r.intensity = gaussians.intensities[g];
  return r;
}

// q = dᵀ P d in the documented order, P = (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz), grouped by what stays fixed along a
// row of voxels (fixed dy, dz), as the CPU voxelizer hoists it out of its loop over the row:
//   q = dx·(Pxx·dx + 2·b) + c,   b = Pxy·dy + Pxz·dz,   c = dy·(Pyy·dy + (2·Pyz)·dz) + (Pzz·dz)·dz
// (float32 or float64, one rounding per operation).
template <typename T>
CTRECON_HD T row_linear_term(const T* P, T dy, T dz) {
  return add_rn(mul_rn(P[1], dy), mul_rn(P[2], dz));
}

template <typename T>
CTRECON_HD T row_constant_term(const T* P, T dy, T dz) {
  return add_rn(mul_rn(dy, add_rn(mul_rn(P[3], dy), mul_rn(mul_rn(T(2), P[4]), dz))), mul_rn(mul_rn(P[5], dz), dz));
}

template <typename T>
CTRECON_HD T row_mahalanobis(T pxx, T dx, T linear, T constant) {
  return add_rn(mul_rn(dx, add_rn(mul_rn(pxx, dx), mul_rn(T(2), linear))), constant);
}

// Whether the Gaussian contributes to the site; if so d = p - μ and e = exp(-q/2). The reference keeps a
// pair unless q > k² (so a NaN q is kept, as there).
CTRECON_HD bool gaussian_term(const GaussianRecord& r, const Site& s, float k2, float* d, float& e) {
  for (int a = 0; a < 3; ++a) {
    if (s.cell[a] < r.lo[a] || s.cell[a] > r.hi[a]) return false;
  }
  const float dx = sub_rn(s.pos[0], r.mean[0]), dy = sub_rn(s.pos[1], r.mean[1]), dz = sub_rn(s.pos[2], r.mean[2]);
  const float q = row_mahalanobis(r.prec[0], dx, row_linear_term(r.prec, dy, dz), row_constant_term(r.prec, dy, dz));
  if (q > k2) return false;
  d[0] = dx;
  d[1] = dy;
  d[2] = dz;
  e = expf(-0.5f * q);
  return true;
}

// Value I·exp(-q/2) of the Gaussian at the site (0 when excluded).
CTRECON_HD float gaussian_value(const GaussianRecord& r, const Site& s, float k2) {
  float d[3], e;
  return gaussian_term(r, s, k2, d, e) ? r.intensity * e : 0.0f;
}

// The site's share of the Gaussian's backward moments for upstream gradient `grad` (m = 0 when excluded);
// returns whether any is nonzero.
CTRECON_HD bool gaussian_moments(const GaussianRecord& r, const Site& s, float k2, float grad, float* m) {
  float d[3] = {0.0f, 0.0f, 0.0f}, e = 0.0f;
  const float w = gaussian_term(r, s, k2, d, e) ? grad * e : 0.0f;
  const float wx = w * d[0], wy = w * d[1], wz = w * d[2];
  m[0] = w;
  m[1] = wx;
  m[2] = wy;
  m[3] = wz;
  m[4] = wx * d[0];
  m[5] = wx * d[1];
  m[6] = wx * d[2];
  m[7] = wy * d[1];
  m[8] = wy * d[2];
  m[9] = wz * d[2];
  return w != 0.0f;
}

// ---- sites of a tile key: chunks of kVoxelizeBlock sites, thread t of a block handles one of them.
// site() fills the thread's site and output index and says whether it has one.

CTRECON_HD int64_t site_chunks(const DenseSites&, int64_t) { return 1; }

CTRECON_HD bool site_of(const DenseSites& sites, int64_t key, int64_t, int thread, Site& s, int64_t& out_index) {
  const Lattice& L = sites.lattice;
  const int64_t item = key / L.tiles_per_item, tile = key % L.tiles_per_item;
  const int64_t tx = tile % L.tiles[0], ty = (tile / L.tiles[0]) % L.tiles[1], tz = tile / (L.tiles[0] * L.tiles[1]);
  const int64_t i = tx * L.tile[0] + thread % L.tile[0];
  const int64_t j = ty * L.tile[1] + (thread / L.tile[0]) % L.tile[1];
  const int64_t k = tz * L.tile[2] + thread / (L.tile[0] * L.tile[1]);
  if (i >= L.n[0] || j >= L.n[1] || k >= L.n[2]) return false;
  s.pos[0] = sites.xs[i];
  s.pos[1] = sites.ys[j];
  s.pos[2] = sites.zs[k];
  s.cell[0] = static_cast<int32_t>(i);
  s.cell[1] = static_cast<int32_t>(j);
  s.cell[2] = static_cast<int32_t>(k);
  out_index = ((item * L.n[2] + k) * L.n[1] + j) * L.n[0] + i;
  return true;
}

CTRECON_HD int64_t site_chunks(const PointSites& sites, int64_t key) {
  const int64_t count = sites.ends[key] - list_begin(sites.ends, key);
  return (count + kVoxelizeBlock - 1) / kVoxelizeBlock;
}

CTRECON_HD bool site_of(const PointSites& sites, int64_t key, int64_t chunk, int thread, Site& s,
                        int64_t& out_index) {
  const int64_t index = list_begin(sites.ends, key) + chunk * kVoxelizeBlock + thread;
  if (index >= sites.ends[key]) return false;
  const int64_t row = sites.order[index];
  for (int a = 0; a < 3; ++a) {
    s.pos[a] = sites.points[3 * row + a];
    s.cell[a] = sites.cells[3 * row + a];
  }
  out_index = row;
  return true;
}

}  // namespace ctrecon
