// Torch binding of the ctrecon CUDA kernels: checks the tensors, takes their device pointers and calls the
// torch-free launchers of cuda/kernels.h. Host C++ only (no CUDA headers): the caller (ctrecon/operators/)
// selects the tensors' device and passes the current CUDA stream as an integer. Outputs are
// preallocated by the caller. Built on first use by torch.utils.cpp_extension together with cuda/*.cu.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "projector.cuh"

namespace {

using torch::Tensor;
namespace kernels = ctrecon::cuda;

void check(const Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes() == torch::IntArrayRef(shape), name, " has shape ", t.sizes(), ", expected ",
              torch::IntArrayRef(shape));
}

void same_device(std::initializer_list<const Tensor*> tensors) {
  const auto device = (*tensors.begin())->device();
  for (const Tensor* t : tensors) TORCH_CHECK(t->device() == device, "all tensors must be on ", device);
}

void launched(int code, const char* what) {
  TORCH_CHECK(code == 0, "ctrecon CUDA ", what, " failed: ", kernels::error_string(code));
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// ---------------------------------------------------------------- projector
void check_views(const Tensor& views) {
  check(views, "views", torch::kFloat64);
  TORCH_CHECK(views.dim() == 2 && views.size(1) == ctrecon::kViewFields, "views must be [A, 12]");
}

void project_forward(const Tensor& volume, const Tensor& views, const std::vector<double>& spacing, Tensor out,
                     int64_t stream) {
  check(volume, "volume", torch::kFloat32);
  check(out, "out", torch::kFloat32);
  check_views(views);
  same_device({&volume, &views, &out});
  TORCH_CHECK(spacing.size() == 3, "spacing must be (dx, dy, dz)");
  TORCH_CHECK(volume.dim() == 3 && out.dim() == 3 && out.size(0) == views.size(0),
              "volume must be [Z, Y, X] and out [A, V, U] with A = views");
  launched(kernels::project_forward(volume.data_ptr<float>(), volume.size(0), volume.size(1), volume.size(2),
                                    views.data_ptr<double>(), out.size(0), out.size(1), out.size(2), spacing.data(),
                                    out.data_ptr<float>(), as_stream(stream)),
           "projection");
}

void project_adjoint(const Tensor& projections, const Tensor& views, const std::vector<double>& spacing, Tensor out,
                     int64_t stream) {
  check(projections, "projections", torch::kFloat32);
  check(out, "out", torch::kFloat32);
  check_views(views);
  same_device({&projections, &views, &out});
  TORCH_CHECK(spacing.size() == 3, "spacing must be (dx, dy, dz)");
  TORCH_CHECK(projections.dim() == 3 && out.dim() == 3 && projections.size(0) == views.size(0),
              "projections must be [A, V, U] with A = views and out [Z, Y, X]");
  launched(kernels::project_adjoint(projections.data_ptr<float>(), projections.size(0), projections.size(1),
                                    projections.size(2), views.data_ptr<double>(), spacing.data(), out.size(0),
                                    out.size(1), out.size(2), out.data_ptr<float>(), as_stream(stream)),
           "adjoint projection");
}

// ---------------------------------------------------------------- FDK
void fdk_backproject(const Tensor& filtered, const Tensor& xs, const Tensor& ys, const Tensor& zs,
                     const Tensor& cos_theta, const Tensor& sin_theta, const Tensor& weights,
                     const std::vector<double>& scan, Tensor out, int64_t stream) {
  for (const auto& [t, name] : std::vector<std::pair<const Tensor*, const char*>>{
           {&filtered, "filtered"}, {&xs, "xs"}, {&ys, "ys"}, {&zs, "zs"}, {&cos_theta, "cos"},
           {&sin_theta, "sin"}, {&weights, "weights"}, {&out, "out"}})
    check(*t, name, torch::kFloat32);
  same_device({&filtered, &xs, &ys, &zs, &cos_theta, &sin_theta, &weights, &out});
  TORCH_CHECK(scan.size() == 6, "scan must be (DSO, DSD, du, dv, ou, ov)");
  TORCH_CHECK(filtered.dim() == 3, "filtered must be [A, V, U]");
  const int64_t n_views = filtered.size(0);
  for (const Tensor* t : {&cos_theta, &sin_theta, &weights}) check_shape(*t, "view table", {n_views});
  check_shape(out, "out", {zs.numel(), ys.numel(), xs.numel()});
  launched(kernels::fdk_backproject(filtered.data_ptr<float>(), n_views, filtered.size(1), filtered.size(2),
                                    xs.data_ptr<float>(), xs.numel(), ys.data_ptr<float>(), ys.numel(),
                                    zs.data_ptr<float>(), zs.numel(), cos_theta.data_ptr<float>(),
                                    sin_theta.data_ptr<float>(), weights.data_ptr<float>(), scan.data(),
                                    out.data_ptr<float>(), as_stream(stream)),
           "FDK backprojection");
}

// ---------------------------------------------------------------- voxelizer
// lattice = (nx, ny, nz, tile_x, tile_y, tile_z, gaussians_per_item)
ctrecon::Lattice make_lattice(const std::vector<int64_t>& spec) {
  TORCH_CHECK(spec.size() == 7, "lattice must be (nx, ny, nz, tile_x, tile_y, tile_z, gaussians_per_item)");
  int32_t n[3], tile[3];
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(spec[a] > 0 && spec[a] <= std::numeric_limits<int32_t>::max() && spec[3 + a] > 0 &&
                    spec[3 + a] <= 1024,
                "bad lattice size");
    n[a] = static_cast<int32_t>(spec[a]);
    tile[a] = static_cast<int32_t>(spec[3 + a]);
  }
  TORCH_CHECK(spec[6] > 0, "gaussians_per_item must be positive");
  return ctrecon::make_lattice(n, tile, spec[6]);
}

ctrecon::Boxes boxes_of(const Tensor& lo, const Tensor& hi, int64_t n_gaussians) {
  check(lo, "lo", torch::kInt32);
  check(hi, "hi", torch::kInt32);
  check_shape(lo, "lo", {n_gaussians, 3});
  check_shape(hi, "hi", {n_gaussians, 3});
  return ctrecon::Boxes{lo.data_ptr<int32_t>(), hi.data_ptr<int32_t>()};
}

void tile_counts(const Tensor& lo, const Tensor& hi, const std::vector<int64_t>& lattice, Tensor counts,
                 int64_t stream) {
  check(counts, "counts", torch::kInt64);
  same_device({&lo, &hi, &counts});
  const int64_t n = counts.numel();
  launched(kernels::gaussian_tile_counts(boxes_of(lo, hi, n), n, make_lattice(lattice), counts.data_ptr<int64_t>(),
                                         as_stream(stream)),
           "tile counting");
}

void tile_pairs(const Tensor& lo, const Tensor& hi, const Tensor& ends, const std::vector<int64_t>& lattice,
                Tensor keys, Tensor ids, int64_t stream) {
  check(ends, "ends", torch::kInt64);
  check(keys, "keys", torch::kInt32);
  check(ids, "ids", torch::kInt32);
  same_device({&lo, &hi, &ends, &keys, &ids});
  const int64_t n = ends.numel();
  TORCH_CHECK(ids.numel() == keys.numel(), "keys and ids must have the same length");
  launched(kernels::gaussian_tile_pairs(boxes_of(lo, hi, n), ends.data_ptr<int64_t>(), n, keys.numel(),
                                        make_lattice(lattice), keys.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
                                        as_stream(stream)),
           "tile pairing");
}

void point_tile_keys(const Tensor& cells, int64_t points_per_item, const std::vector<int64_t>& lattice, Tensor keys,
                     int64_t stream) {
  check(cells, "cells", torch::kInt32);
  check(keys, "keys", torch::kInt32);
  same_device({&cells, &keys});
  check_shape(cells, "cells", {keys.numel(), 3});
  TORCH_CHECK(points_per_item > 0, "points_per_item must be positive");
  launched(kernels::point_tile_keys(cells.data_ptr<int32_t>(), keys.numel(), points_per_item, make_lattice(lattice),
                                    keys.data_ptr<int32_t>(), as_stream(stream)),
           "point tile keys");
}

struct Prepared {
  ctrecon::Gaussians gaussians;
  ctrecon::TileLists lists;
  ctrecon::Lattice lattice;
  int64_t n_keys;
};

Prepared prepare(const Tensor& means, const Tensor& prec, const Tensor& intensities, const Tensor& lo,
                 const Tensor& hi, const Tensor& ids, const Tensor& tile_ends, const std::vector<int64_t>& lattice) {
  check(means, "means", torch::kFloat32);
  check(prec, "prec", torch::kFloat32);
  check(intensities, "intensities", torch::kFloat32);
  check(ids, "ids", torch::kInt32);
  check(tile_ends, "tile_ends", torch::kInt64);
  same_device({&means, &prec, &intensities, &lo, &hi, &ids, &tile_ends});
  const int64_t n = means.size(0);
  check_shape(means, "means", {n, 3});
  check_shape(prec, "prec", {n, 6});
  check_shape(intensities, "intensities", {n});
  Prepared p;
  p.lattice = make_lattice(lattice);
  p.n_keys = tile_ends.numel();
  TORCH_CHECK(p.n_keys % p.lattice.tiles_per_item == 0 && p.n_keys <= std::numeric_limits<int32_t>::max(),
              "tile_ends must hold items × tiles_per_item entries (fewer than 2^31)");
  p.gaussians = ctrecon::Gaussians{means.data_ptr<float>(), prec.data_ptr<float>(), intensities.data_ptr<float>(),
                                   boxes_of(lo, hi, n)};
  p.lists = ctrecon::TileLists{ids.data_ptr<int32_t>(), tile_ends.data_ptr<int64_t>()};
  return p;
}

ctrecon::DenseSites dense_sites(const Prepared& p, const Tensor& xs, const Tensor& ys, const Tensor& zs,
                                const Tensor& out) {
  for (const Tensor* t : {&xs, &ys, &zs}) check(*t, "voxel coordinates", torch::kFloat32);
  same_device({&xs, &ys, &zs, &out});
  const ctrecon::Lattice& L = p.lattice;
  TORCH_CHECK(xs.numel() == L.n[0] && ys.numel() == L.n[1] && zs.numel() == L.n[2],
              "voxel coordinate tables must match the lattice");
  TORCH_CHECK(static_cast<int64_t>(L.tile[0]) * L.tile[1] * L.tile[2] == ctrecon::kVoxelizeBlock,
              "a dense tile must hold ", ctrecon::kVoxelizeBlock, " voxels");
  TORCH_CHECK(out.numel() == p.n_keys / L.tiles_per_item * L.n[0] * L.n[1] * L.n[2],
              "output size must be items × Z × Y × X");
  return ctrecon::DenseSites{L, xs.data_ptr<float>(), ys.data_ptr<float>(), zs.data_ptr<float>()};
}

ctrecon::PointSites point_sites(const Prepared& p, const Tensor& points, const Tensor& cells, const Tensor& order,
                                const Tensor& point_ends, const Tensor& out) {
  check(points, "points", torch::kFloat32);
  check(cells, "cells", torch::kInt32);
  check(order, "order", torch::kInt64);
  check(point_ends, "point_ends", torch::kInt64);
  same_device({&points, &cells, &order, &point_ends, &out});
  const int64_t n = out.numel();
  check_shape(points, "points", {n, 3});
  check_shape(cells, "cells", {n, 3});
  check_shape(order, "order", {n});
  check_shape(point_ends, "point_ends", {p.n_keys});
  return ctrecon::PointSites{p.lattice, points.data_ptr<float>(), cells.data_ptr<int32_t>(),
                             order.data_ptr<int64_t>(), point_ends.data_ptr<int64_t>()};
}

void dense_forward(const Tensor& means, const Tensor& prec, const Tensor& intensities, const Tensor& lo,
                   const Tensor& hi, const Tensor& ids, const Tensor& tile_ends, const std::vector<int64_t>& lattice,
                   const Tensor& xs, const Tensor& ys, const Tensor& zs, double k2, Tensor out, int64_t stream) {
  check(out, "out", torch::kFloat32);
  const Prepared p = prepare(means, prec, intensities, lo, hi, ids, tile_ends, lattice);
  launched(kernels::voxelize_dense_forward(p.gaussians, p.lists, dense_sites(p, xs, ys, zs, out), p.n_keys,
                                           static_cast<float>(k2), out.data_ptr<float>(), out.numel(),
                                           as_stream(stream)),
           "voxelization");
}

void dense_backward(const Tensor& means, const Tensor& prec, const Tensor& intensities, const Tensor& lo,
                    const Tensor& hi, const Tensor& ids, const Tensor& tile_ends, const std::vector<int64_t>& lattice,
                    const Tensor& xs, const Tensor& ys, const Tensor& zs, double k2, const Tensor& grad_out,
                    Tensor moments, int64_t stream) {
  check(grad_out, "grad_out", torch::kFloat32);
  check(moments, "moments", torch::kFloat32);
  const Prepared p = prepare(means, prec, intensities, lo, hi, ids, tile_ends, lattice);
  check_shape(moments, "moments", {means.size(0), ctrecon::kMoments});
  same_device({&means, &moments});
  launched(kernels::voxelize_dense_backward(p.gaussians, p.lists, dense_sites(p, xs, ys, zs, grad_out), p.n_keys,
                                            static_cast<float>(k2), grad_out.data_ptr<float>(),
                                            moments.data_ptr<float>(), means.size(0), as_stream(stream)),
           "voxelization backward");
}

void points_forward(const Tensor& means, const Tensor& prec, const Tensor& intensities, const Tensor& lo,
                    const Tensor& hi, const Tensor& ids, const Tensor& tile_ends, const std::vector<int64_t>& lattice,
                    const Tensor& points, const Tensor& cells, const Tensor& order, const Tensor& point_ends,
                    double k2, Tensor out, int64_t stream) {
  check(out, "out", torch::kFloat32);
  const Prepared p = prepare(means, prec, intensities, lo, hi, ids, tile_ends, lattice);
  launched(kernels::voxelize_points_forward(p.gaussians, p.lists,
                                            point_sites(p, points, cells, order, point_ends, out), p.n_keys,
                                            static_cast<float>(k2), out.data_ptr<float>(), out.numel(),
                                            as_stream(stream)),
           "point rendering");
}

void points_backward(const Tensor& means, const Tensor& prec, const Tensor& intensities, const Tensor& lo,
                     const Tensor& hi, const Tensor& ids, const Tensor& tile_ends, const std::vector<int64_t>& lattice,
                     const Tensor& points, const Tensor& cells, const Tensor& order, const Tensor& point_ends,
                     double k2, const Tensor& grad_out, Tensor moments, int64_t stream) {
  check(grad_out, "grad_out", torch::kFloat32);
  check(moments, "moments", torch::kFloat32);
  const Prepared p = prepare(means, prec, intensities, lo, hi, ids, tile_ends, lattice);
  check_shape(moments, "moments", {means.size(0), ctrecon::kMoments});
  same_device({&means, &moments});
  launched(kernels::voxelize_points_backward(p.gaussians, p.lists,
                                             point_sites(p, points, cells, order, point_ends, grad_out), p.n_keys,
                                             static_cast<float>(k2), grad_out.data_ptr<float>(),
                                             moments.data_ptr<float>(), means.size(0), as_stream(stream)),
           "point rendering backward");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ctrecon CUDA kernels (projector, FDK backprojection, Gaussian voxelizer); see ctrecon/operators/";
  m.def("project_forward", &project_forward, "Joseph projection volume [Z,Y,X] -> out [A,V,U]");
  m.def("project_adjoint", &project_adjoint, "exact adjoint projections [A,V,U] -> out [Z,Y,X]");
  m.def("fdk_backproject", &fdk_backproject, "FDK voxel-driven backprojection -> out [Z,Y,X]");
  m.def("tile_counts", &tile_counts, "tiles overlapped by each Gaussian box");
  m.def("tile_pairs", &tile_pairs, "(tile key, Gaussian id) of every overlap");
  m.def("point_tile_keys", &point_tile_keys, "tile key of every query point");
  m.def("dense_forward", &dense_forward, "voxelize into a dense grid");
  m.def("dense_backward", &dense_backward, "moments of the dense voxelizer's backward");
  m.def("points_forward", &points_forward, "render at query points");
  m.def("points_backward", &points_backward, "moments of the point renderer's backward");
}
