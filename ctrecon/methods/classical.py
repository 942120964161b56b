"""Classical iterative reconstruction on the cone-beam projector ``A`` of :mod:`ctrecon.operators.projector`.

Every solver is a step-wise object (:class:`IterativeSolver`): ``solver.step()`` runs one iteration and
returns the solver's own loss, ``solver.x`` is the current estimate ``[Z, Y, X]`` (dtype and device of the
projections ``b`` ``[A, V, U]``), so a caller can time, evaluate or stop between iterations. The start
``x0`` defaults to zeros. All arithmetic is torch, under ``torch.no_grad()``. Notation: M rays (A·V·U),
N voxels (Z·Y·X), ``1`` a tensor of ones, ⊙ and fractions elementwise.

**SART / OS-SART** (Andersen & Kak 1984; ordered subsets as in TIGRE's OS-SART). The views are split into
``subsets`` interleaved blocks, block k = views k, k + subsets, k + 2·subsets, … (each block spans the
angles); ``"sart"`` has one view per block, ``"os-sart"`` 20 blocks by default (all views if fewer). One
step is one pass over all blocks, in the ``order`` "golden" (default): block indices sorted by the
fractional part of k·(√5 − 1)/2, the same every pass, so that consecutive blocks are far apart in angle
(the golden-ratio ordering of Kohler 2004; TIGRE's default is an angular-distance order for the same
reason), or "random": a permutation drawn per pass from a ``torch.Generator`` seeded with ``seed``
(measured on the development CT: one pass of single-view SART varies by ±1 dB with the seed). For block S::

    x ← x + λ · V_S ⊙ A_Sᵀ( W_S ⊙ (b_S − A_S x) ),   then x ← max(x, 0) if nonnegative
    W_S = 1 / (A_S 1)  on rays longer than half the smallest voxel side (mm), else 0
    V_S = 1 / (A_Sᵀ 1) where A_Sᵀ 1 > 1e-6 · max(A_Sᵀ 1), else 0 (voxels the block hardly sees stay)

The relaxation λ starts at ``relaxation`` ∈ (0, 2) and is multiplied by ``relaxation_decay`` ∈ (0, 1] after
every pass. The W_S are one projection-sized tensor; the V_S (one volume per block) are cached while they
fit ``memory_budget`` bytes, else recomputed for every block visit (one more ``A_Sᵀ`` per block). The loss is
the mean squared residual of the pass, ``Σ_S ‖b_S − A_S x‖² / M`` with each block's residual taken just
before its update.

**CGLS** (conjugate gradients on the normal equations AᵀA x = Aᵀb; Hansen, *Discrete Inverse Problems*,
2010, §6.3), unconstrained::

    start: r = b − A x0,  s = Aᵀ r,  p = s,  γ = ‖s‖²
    step:  q = A p,  α = γ / ‖q‖²,  x ← x + α p,  r ← r − α q,
           s = Aᵀ r,  γ' = ‖s‖²,  p ← s + (γ'/γ) p,  γ ← γ'

One A and one Aᵀ per step; the loss is ``‖r‖² / M`` after it. When γ or ‖q‖² is exactly 0 (an exact
least-squares solution) the iteration has converged and further steps change nothing.

**FISTA-TV** minimises, over x ≥ 0 (``nonnegative``, default) or all x::

    F(x) = ½ · mean_rays((A x − b)²) / s²  +  λ · TV(x),   s = max|b| (1 if b = 0),  λ = tv_weight
    TV(x) = mean_voxels √((∇_x x)² + (∇_y x)² + (∇_z x)²)

with forward differences in voxel units, ``(∇_k x)[i] = x[i+1] − x[i]`` and 0 at the last index of axis k
(Neumann border). The iteration is the monotone MFISTA of Beck & Teboulle, "Fast gradient-based
algorithms for constrained total variation image denoising and deblurring", IEEE TIP 18(11), 2009::

    y_1 = x_0,  t_1 = 1
    z_k = prox( y_k − ∇f(y_k)/L ),   ∇f(y) = Aᵀ(A y − b) / (M s²)
    t_{k+1} = (1 + √(1 + 4 t_k²)) / 2
    x_k = z_k if F(z_k) ≤ F(x_{k−1}) else x_{k−1}                    (so F never increases)
    y_{k+1} = x_k + (t_k/t_{k+1}) (z_k − x_k) + ((t_k − 1)/t_{k+1}) (x_k − x_{k−1})

where prox = :func:`tv_prox` with weight λ / (L·N) (the prox of (λ/L)·TV, TV being a mean), warm-started
from the previous step's dual variable. L = 1.05 · ‖AᵀA‖ / (M s²), ‖AᵀA‖ from :func:`power_norm`, or
``lipschitz`` (this L) when given. A y is kept as the same combination of A x_k, A z_k, A x_{k−1}, so a
step costs one A and one Aᵀ. The loss is F(x_k). With ``nonnegative`` the start is clipped to x0 ≥ 0.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import numpy as np
import torch

from ctrecon.core.errors import InputError
from ctrecon.operators.projector import Projector

__all__ = ["IterativeSolver", "SART", "OSSART", "CGLS", "FISTATV", "SOLVERS", "DEFAULT_TV_WEIGHT", "make_solver",
           "tv_prox",
           "tv", "gradient", "gradient_adjoint", "power_norm"]

#: FISTA-TV's λ when none is given: the best of 3e-4, 1e-3, 3e-3 on the development lung1 CT (48×96×96 at 3 mm,
#: 120 views, dose 1e5; scripts/bench_classical.py, data/README.md).
DEFAULT_TV_WEIGHT = 3e-4
#: SART / OS-SART block orders (see the module doc).
BLOCK_ORDERS = ("golden", "random")
#: ‖∇‖² ≤ 4·d for forward differences in d = 3 dimensions.
_GRADIENT_NORM_SQ = 12.0


# --------------------------------------------------------------------------- total variation
def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences ``[3, Z, Y, X]`` (along z, y, x; voxel units) of ``x`` ``[Z, Y, X]``, 0 at the far border."""
    out = x.new_zeros((3, *x.shape))
    out[0, :-1] = x[1:] - x[:-1]
    out[1, :, :-1] = x[:, 1:] - x[:, :-1]
    out[2, :, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    return out


def gradient_adjoint(p: torch.Tensor) -> torch.Tensor:
    """The exact transpose of :func:`gradient`: ``[3, Z, Y, X]`` → ``[Z, Y, X]`` (−divergence)."""
    out = p.new_zeros(p.shape[1:])
    out[:-1] -= p[0, :-1]
    out[1:] += p[0, :-1]
    out[:, :-1] -= p[1, :, :-1]
    out[:, 1:] += p[1, :, :-1]
    out[:, :, :-1] -= p[2, :, :, :-1]
    out[:, :, 1:] += p[2, :, :, :-1]
    return out


def tv(x: torch.Tensor) -> float:
    """Isotropic total variation of ``x`` ``[Z, Y, X]``: the mean over voxels of ``|∇x|`` (see the module doc)."""
    return float(gradient(x).square().sum(0).sqrt().mean())


def tv_prox(v: torch.Tensor, weight: float, iterations: int = 20, nonnegative: bool = True,
            dual: Optional[torch.Tensor] = None) -> tuple:
    """``argmin_x ½‖x − v‖² + weight · Σ_voxels |∇x|`` over x ≥ 0 (``nonnegative``) or all x.

    Equivalently ``½·mean((x − v)²) + weight·TV(x)`` (the same ``weight`` as scikit-image's
    ``denoise_tv_chambolle``). Beck & Teboulle's FGP: accelerated projected gradient on the dual
    ``p`` ``[3, Z, Y, X]`` (|p| ≤ 1 per voxel), x(p) = P_C(v − weight·∇ᵀp), step 1/(12·weight),
    ``iterations`` steps from ``dual`` (zeros if None). Returns ``(x [Z, Y, X], dual [3, Z, Y, X])``.
    """
    if not weight >= 0:
        raise InputError(f"the TV weight must be >= 0, got {weight}")
    iterations = _positive_int("iterations", iterations)
    project = (lambda z: z.clamp_(min=0.0)) if nonnegative else (lambda z: z)
    p = v.new_zeros((3, *v.shape)) if dual is None else dual.clone()
    if weight == 0:
        return project(v.clone()), p
    r, t = p.clone(), 1.0
    for _ in range(iterations):
        x = project(v - weight * gradient_adjoint(r))
        previous = p
        p = r + gradient(x) / (_GRADIENT_NORM_SQ * weight)
        p /= p.square().sum(0, keepdim=True).sqrt_().clamp_(min=1.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        r = p + ((t - 1.0) / t_next) * (p - previous)
        t = t_next
    return project(v - weight * gradient_adjoint(p)), p


def power_norm(projector: Projector, iterations: int = 15, seed: int = 0, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> float:
    """Estimate of ‖AᵀA‖ (the largest eigenvalue, mm²) by ``iterations`` power iterations from a seeded
    normal start; a lower bound that converges from below (multiply by a safety factor for a Lipschitz bound)."""
    iterations = _positive_int("iterations", iterations)
    generator = torch.Generator().manual_seed(int(seed))
    v = torch.randn(projector.volume_shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    v /= v.norm()
    estimate = 0.0
    with torch.no_grad():
        for _ in range(iterations):
            w = projector.T(projector(v))
            estimate = float(w.norm())
            if estimate == 0.0:
                break
            v = w / estimate
    if estimate == 0.0:
        raise InputError("the projector sees none of the volume (AᵀA is zero)")
    return estimate


# --------------------------------------------------------------------------- solvers
class IterativeSolver:
    """Base of the solvers: checks the projector, projections ``[A, V, U]`` and start ``x0`` ``[Z, Y, X]``.

    ``x``: current estimate (projections' dtype and device); ``iteration``: completed steps; ``step()``:
    one iteration, returns the solver's loss (see the module doc).
    """

    name: str = ""

    def __init__(self, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None):
        if not isinstance(projector, Projector):
            raise InputError(f"{self.name} needs a Projector, got {type(projector).__name__}")
        if not isinstance(projections, torch.Tensor) or projections.dtype not in (torch.float32, torch.float64):
            raise InputError("projections must be a float32 or float64 torch tensor")
        if tuple(projections.shape) != tuple(projector.projection_shape):
            raise InputError(f"projections must have shape [A, V, U] = {tuple(projector.projection_shape)}, "
                             f"got {tuple(projections.shape)}")
        if not bool(torch.isfinite(projections).all()):
            raise InputError("projections must be finite")
        self.projector = projector
        self.b = projections.detach()
        like = dict(dtype=self.b.dtype, device=self.b.device)
        if x0 is None:
            self.x = torch.zeros(projector.volume_shape, **like)
        else:
            x0 = torch.as_tensor(x0)
            if tuple(x0.shape) != tuple(projector.volume_shape):
                raise InputError(f"x0 must have shape [Z, Y, X] = {tuple(projector.volume_shape)}, "
                                 f"got {tuple(x0.shape)}")
            self.x = x0.detach().to(**like).clone()
        self.iteration = 0

    @property
    def n_rays(self) -> int:
        return self.b.numel()

    def step(self) -> float:
        """One iteration; returns the solver's loss."""
        with torch.no_grad():
            loss = self._step()
        self.iteration += 1
        return loss

    def run(self, iterations: int, callback: Optional[Callable[["IterativeSolver", float], None]] = None) -> list:
        """``iterations`` steps (``callback(solver, loss)`` after each); returns the losses."""
        iterations = _positive_int("iterations", iterations)
        losses = []
        for _ in range(iterations):
            losses.append(self.step())
            if callback is not None:
                callback(self, losses[-1])
        return losses

    def _step(self) -> float:
        raise NotImplementedError


class OSSART(IterativeSolver):
    """OS-SART: ``subsets`` interleaved blocks of views (default 20, or all views if fewer); see the module doc."""

    name = "os-sart"

    def __init__(self, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None, *,
                 subsets: Optional[int] = None, relaxation: float = 1.0, relaxation_decay: float = 0.99,
                 nonnegative: bool = True, order: str = "golden", seed: int = 0, memory_budget: int = 2 ** 30):
        super().__init__(projector, projections, x0)
        n_views = projector.n_views
        if order not in BLOCK_ORDERS:
            raise InputError(f"order must be one of {', '.join(BLOCK_ORDERS)}, got {order!r}")
        subsets = min(20, n_views) if subsets is None else _positive_int("subsets", subsets)
        if subsets > n_views:
            raise InputError(f"subsets ({subsets}) cannot exceed the number of views ({n_views})")
        if not 0.0 < float(relaxation) < 2.0:
            raise InputError(f"relaxation must lie in (0, 2), got {relaxation}")
        if not 0.0 < float(relaxation_decay) <= 1.0:
            raise InputError(f"relaxation_decay must lie in (0, 1], got {relaxation_decay}")
        if int(memory_budget) <= 0:
            raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.subsets = subsets
        self.relaxation = float(relaxation)
        self.relaxation_decay = float(relaxation_decay)
        self.nonnegative = bool(nonnegative)
        self.order = order
        self._generator = torch.Generator().manual_seed(int(seed))
        self._golden = np.argsort(np.modf(np.arange(subsets) * (math.sqrt(5.0) - 1.0) / 2.0)[0], kind="stable")
        device = self.b.device
        self._views = [np.arange(k, n_views, subsets) for k in range(subsets)]
        self._view_index = [torch.as_tensor(v, device=device) for v in self._views]
        self._blocks = [projector.subset(v) for v in self._views]
        with torch.no_grad():
            ray_lengths = projector(torch.ones_like(self.x))
            shortest = min(projector.geometry.dVoxel) / 2.0
            self._ray_weights = torch.where(ray_lengths > shortest, 1.0 / ray_lengths, torch.zeros_like(ray_lengths))
            volume_bytes = self.x.numel() * self.x.element_size()
            self._cache_volume_weights = subsets * volume_bytes <= int(memory_budget)
            self._volume_weights = ([self._volume_weight(k) for k in range(subsets)]
                                    if self._cache_volume_weights else None)

    def _volume_weight(self, block: int) -> torch.Tensor:
        """V_S = 1 / (A_Sᵀ 1) ``[Z, Y, X]``, 0 where the block hardly sees a voxel."""
        A_S = self._blocks[block]
        coverage = A_S.T(torch.ones(A_S.projection_shape, dtype=self.b.dtype, device=self.b.device))
        seen = coverage > 1e-6 * coverage.max()
        return torch.where(seen, 1.0 / coverage, torch.zeros_like(coverage))

    def _step(self) -> float:
        squared_residual = 0.0
        blocks = (self._golden.tolist() if self.order == "golden"
                  else torch.randperm(self.subsets, generator=self._generator).tolist())
        for block in blocks:
            A_S, views = self._blocks[block], self._view_index[block]
            residual = self.b[views] - A_S(self.x)
            squared_residual += float(residual.square().sum())
            weights = self._volume_weights[block] if self._cache_volume_weights else self._volume_weight(block)
            self.x += self.relaxation * weights * A_S.T(self._ray_weights[views] * residual)
            if self.nonnegative:
                self.x.clamp_(min=0.0)
        self.relaxation *= self.relaxation_decay
        return squared_residual / self.n_rays


class SART(OSSART):
    """SART: OS-SART with one view per block (see the module doc)."""

    name = "sart"

    def __init__(self, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None, *,
                 relaxation: float = 1.0, relaxation_decay: float = 0.99, nonnegative: bool = True,
                 order: str = "golden", seed: int = 0, memory_budget: int = 2 ** 30):
        super().__init__(projector, projections, x0, subsets=projector.n_views, relaxation=relaxation,
                         relaxation_decay=relaxation_decay, nonnegative=nonnegative, order=order, seed=seed,
                         memory_budget=memory_budget)


class CGLS(IterativeSolver):
    """CGLS on the normal equations, unconstrained (see the module doc); ``converged`` once γ = 0."""

    name = "cgls"

    def __init__(self, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None):
        super().__init__(projector, projections, x0)
        with torch.no_grad():
            self.residual = self.b - projector(self.x)
            s = projector.T(self.residual)
        self._direction = s
        self._gamma = float(s.square().sum())
        self.converged = self._gamma == 0.0

    def _step(self) -> float:
        if not self.converged:
            q = self.projector(self._direction)
            q_norm_sq = float(q.square().sum())
            if q_norm_sq == 0.0:
                self.converged = True
            else:
                alpha = self._gamma / q_norm_sq
                self.x += alpha * self._direction
                self.residual -= alpha * q
                s = self.projector.T(self.residual)
                gamma = float(s.square().sum())
                self._direction = s + (gamma / self._gamma) * self._direction
                self._gamma = gamma
                self.converged = gamma == 0.0
        return float(self.residual.square().sum()) / self.n_rays


class FISTATV(IterativeSolver):
    """Monotone FISTA (MFISTA) on least squares + TV, with FGP for the prox (see the module doc)."""

    name = "fista-tv"

    def __init__(self, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None, *,
                 tv_weight: float = DEFAULT_TV_WEIGHT, tv_iterations: int = 20, nonnegative: bool = True,
                 power_iterations: int = 15, lipschitz: Optional[float] = None, seed: int = 0):
        super().__init__(projector, projections, x0)
        if not float(tv_weight) >= 0.0 or not math.isfinite(float(tv_weight)):
            raise InputError(f"tv_weight must be a finite number >= 0, got {tv_weight}")
        self.tv_weight = float(tv_weight)
        self.tv_iterations = _positive_int("tv_iterations", tv_iterations)
        self.nonnegative = bool(nonnegative)
        self.scale = float(self.b.abs().max()) or 1.0
        self._data_factor = 1.0 / (self.n_rays * self.scale ** 2)
        if lipschitz is None:
            norm = power_norm(projector, _positive_int("power_iterations", power_iterations), seed,
                              dtype=self.b.dtype, device=self.b.device)
            lipschitz = 1.05 * norm * self._data_factor
        elif not float(lipschitz) > 0.0 or not math.isfinite(float(lipschitz)):
            raise InputError(f"lipschitz must be a finite positive number, got {lipschitz}")
        self.lipschitz = float(lipschitz)
        with torch.no_grad():
            if self.nonnegative:
                self.x.clamp_(min=0.0)
            self._Ax = projector(self.x)
            self._F = self._objective(self.x, self._Ax)
            self._y, self._Ay = self.x.clone(), self._Ax.clone()
        self._t = 1.0
        self._dual = None

    def objective(self, x: torch.Tensor) -> float:
        """F(x) of the module doc (the constraint x ≥ 0 is not checked)."""
        with torch.no_grad():
            x = x.to(dtype=self.b.dtype, device=self.b.device)
            return self._objective(x, self.projector(x))

    def _objective(self, x: torch.Tensor, Ax: torch.Tensor) -> float:
        data = 0.5 * float((Ax - self.b).square().sum()) * self._data_factor
        return data + (self.tv_weight * tv(x) if self.tv_weight else 0.0)

    def _step(self) -> float:
        gradient_y = self.projector.T(self._Ay - self.b) * self._data_factor
        prox_weight = self.tv_weight / (self.lipschitz * self.x.numel())
        z, self._dual = tv_prox(self._y - gradient_y / self.lipschitz, prox_weight, self.tv_iterations,
                                self.nonnegative, self._dual)
        Az = self.projector(z)
        F_z = self._objective(z, Az)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * self._t ** 2)) / 2.0
        x_previous, Ax_previous = self.x, self._Ax
        if F_z <= self._F:
            self.x, self._Ax, self._F = z, Az, F_z
        toward_z, momentum = self._t / t_next, (self._t - 1.0) / t_next
        self._y = self.x + toward_z * (z - self.x) + momentum * (self.x - x_previous)
        self._Ay = self._Ax + toward_z * (Az - self._Ax) + momentum * (self._Ax - Ax_previous)
        self._t = t_next
        return self._F


SOLVERS = {"sart": SART, "os-sart": OSSART, "cgls": CGLS, "fista-tv": FISTATV}


def make_solver(name: str, projector: Projector, projections: torch.Tensor, x0: Optional[torch.Tensor] = None,
                **settings) -> IterativeSolver:
    """The solver ``name`` (a key of :data:`SOLVERS`) with keyword ``settings`` (its constructor's)."""
    key = str(name).lower().replace("_", "-")
    if key not in SOLVERS:
        raise InputError(f"unknown solver {name!r} (choose one of {', '.join(SOLVERS)})")
    cls = SOLVERS[key]
    known = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)} for {key} (known: {', '.join(known) or 'none'})")
    return cls(projector, projections, x0, **settings)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
