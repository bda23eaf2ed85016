"""Top eigenpairs of a large symmetric positive semi-definite matrix without a full ``eigh``.

EoRA's truncated SVDs need only the top ``r`` eigenvectors of a Gram matrix (``r = 128`` of
4096 for an 8B layer), and ``damping="auto"`` needs one per ridge candidate. A full ``eigh`` of
4096² costs 0.11 s on an H200 (cuSOLVER's tridiagonalisation is latency-bound), and the ridge
scoring of one 8B block needs about 36 of them (~4 s; ~125 s for the model). :func:`top_eigh`
finds the top ``r`` by Chebyshev-filtered subspace iteration with Rayleigh–Ritz, which is made of
matrix products::

    >>> import torch
    >>> from peft_eora.topeig import top_eigh
    >>> M = torch.randn(600, 900, dtype=torch.float64)
    >>> lam, vecs = top_eigh(M @ M.T, 16)
    >>> bool(torch.allclose(lam, torch.linalg.eigvalsh(M @ M.T).flip(0)[:16]))
    True

The iteration stops on an a-posteriori bound, not a fixed count: with Ritz pairs ``(θ_i, u_i)``
and residuals ``ρ_i = ‖G·u_i − θ_i·u_i‖``, an eigenvalue lies within ``ρ_i`` of each ``θ_i``, and
within ``ρ_i²/gap`` where ``gap`` separates it from the rest of the spectrum (Kato–Temple; estimated
as ``θ_r − θ_{r+1} − ρ_{r+1}``, from ``θ_r`` to an upper estimate of the next eigenvalue). It runs
until ``Σ min(ρ_i, ρ_i²/gap)`` is under ``tol`` (default 1e-10) of the energy outside the top ``r``,
``tr(G) − Σ θ_i`` (what a truncation leaves: its error), floored at 1e-4 of the top-``r`` energy: the
truncation's error is then the optimum's to about ten digits (checked against ``eigh`` on flat, steep,
clustered, rank-deficient and outlier-dominated spectra in ``tests/test_topeig.py``). Where the bound is
not reached within ``max_products`` products with ``G`` it returns None and callers use ``eigh``. A result
from a ``start`` block is also checked for a larger eigenvalue outside it (a few power steps of 8 random
columns): a start holding exact eigenvectors of smaller eigenvalues passes the residual bound at once.

Each outer step: Rayleigh–Ritz on the block ``V`` (``n × q``, ``q = r + max(r/2, 32)``), then a
Chebyshev polynomial of ``G`` of degree ``m`` applied to the Ritz vectors (again, re-orthonormalised
in between, until the step has made ``step_products`` products: 4 on CPUs, 16 on GPUs), damping
``[0, θ_q]`` (the block's smallest Ritz value: the spectrum that is not wanted) and growing what lies
above it — on flat spectra (quantisation noise) several times faster per product than plain power
iteration. ``m`` is the largest degree (≤ 8) whose growth of ``θ_1`` over ``θ_r`` stays under
1e6, so re-orthonormalising the block by Cholesky QR (twice; Householder QR where that fails)
stays accurate. The start block is drawn from a generator seeded with ``seed``: results are
deterministic per device.

``start`` (any ``n × p`` block, e.g. the Ritz vectors of a nearby matrix from ``info["basis"]``)
replaces the random start: ``damping="auto"`` scores ridges whose Gram matrices differ by a
ridge, and the neighbours' subspaces are most of the way there (one Llama-3-8B-shaped block: 21 %
fewer products and 20 % fewer Rayleigh–Ritz steps; the stopping bound is the same).
"""

from __future__ import annotations

import math
import os

import torch

#: Relative bound on the top-``r`` energy error at which :func:`top_eigh` stops: relative to the energy
#: outside the top ``r`` (the truncation's error), or to ``TAIL_FLOOR`` of the top-``r`` energy where that is less.
DEFAULT_TOL = 1e-10
TAIL_FLOOR = 1e-4

#: Highest Chebyshev degree per outer step, and the largest growth of ``θ_1`` over ``θ_r`` one
#: filter may cause (the block's condition number before re-orthonormalisation).
MAX_DEGREE = 8
MAX_GROWTH = 1e6

#: Products with ``G`` per Rayleigh–Ritz step at least (filters of a low degree are repeated), per
#: device type. On this 2-core CPU a 4096 × 4096 × 192 float64 product takes ~65 ms and a step's
#: ``q × q`` eigh and ``n × q × q`` products ~20 ms: few products per step. On a GPU the product is
#: ~0.15 ms (H200 float64) while the small eigh is latency-bound (milliseconds; ``linalg.py``'s
#: ``small_eigh_fp64_s``): more products per step, fewer steps.
MIN_STEP_PRODUCTS = {"cpu": 4}
MIN_STEP_PRODUCTS_ACCELERATOR = 16

#: Solve the Rayleigh–Ritz step's ``q × q`` eigenproblem on the host when ``G`` is on an
#: accelerator (``PEFT_EORA_TOPEIG_HOST_RR=1``): a 192² ``eigh`` is a few launches-bound
#: milliseconds on a GPU and may be faster in LAPACK; ``linalg.py`` times both. Off by default.
HOST_RAYLEIGH_RITZ = os.environ.get("PEFT_EORA_TOPEIG_HOST_RR", "0") == "1"


def block_size(n: int, rank: int) -> int:
    """Columns of the iterated block for ``rank`` wanted eigenpairs of an ``n × n`` matrix."""
    return min(n, rank + max(rank // 2, 32))


def _orthonormalize(W: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``W``'s columns: Cholesky QR twice (two products and a ``q × q``
    Cholesky each, fast on GPUs), Householder QR where the Gram matrix is not numerically
    positive definite (a rank-deficient or very ill-conditioned block)."""
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(W.mT @ W)
        if int(info) != 0:
            return torch.linalg.qr(W)[0]
        W = torch.linalg.solve_triangular(L.mT, W, upper=True, left=False)
    return W


def _log_cheb(degree: int, x: float) -> float:
    """``log T_m(x)`` for ``x ≥ 1`` (``T_m(x) = cosh(m·acosh x)``) without overflow."""
    y = degree * math.acosh(max(x, 1.0))
    return y + math.log1p(math.exp(-2.0 * y)) - math.log(2.0)


def _degree(theta_1: float, theta_r: float, cut: float) -> int:
    """Largest degree ≤ :data:`MAX_DEGREE` whose filter (damping ``[0, cut]``) grows ``θ_1`` over
    ``θ_r`` by at most :data:`MAX_GROWTH`."""
    x1, xr = 2.0 * theta_1 / cut - 1.0, 2.0 * theta_r / cut - 1.0
    limit = math.log(MAX_GROWTH)
    m = 1
    while m < MAX_DEGREE and _log_cheb(m + 1, x1) - _log_cheb(m + 1, xr) <= limit:
        m += 1
    return m


def top_eigh(G: torch.Tensor, rank: int, tol: float = DEFAULT_TOL, max_products: int = 100,
             seed: int = 0, info: dict | None = None,
             step_products: int | None = None,
             start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(λ, vecs)``: the ``rank`` largest eigenvalues (descending) of the symmetric positive
    semi-definite ``G`` and their eigenvectors (``n × rank``), or None where the error bound was
    not reached within ``max_products`` products with ``G`` (then use ``torch.linalg.eigh``).

    ``G`` is read, never written; its dtype (float64 for EoRA) is the working precision. ``info``,
    when given, receives ``products`` (with ``G``, in blocks of :func:`block_size` columns),
    ``steps`` (Rayleigh–Ritz steps) and ``basis`` (the last block's Ritz vectors, ``n × q``,
    descending: a start for a nearby matrix; None without convergence); ``step_products``: products
    per step at least (default: :data:`MIN_STEP_PRODUCTS` for the device). ``start``: the first block's
    columns (``n × p``, not necessarily orthonormal; filled up with random columns to the block
    size; more columns than that: the first Rayleigh–Ritz step keeps the top ones).
    """
    n = G.shape[0]
    if G.ndim != 2 or G.shape[1] != n:
        raise ValueError(f"top_eigh needs a square matrix, got shape {tuple(G.shape)}.")
    if not 0 < rank <= n:
        raise ValueError(f"top_eigh: rank must be in [1, {n}], got {rank}.")
    if step_products is None:
        step_products = MIN_STEP_PRODUCTS.get(G.device.type, MIN_STEP_PRODUCTS_ACCELERATOR)
    if start is not None and (start.ndim != 2 or start.shape[0] != n or not 1 <= start.shape[1] <= n):
        raise ValueError(f"top_eigh: the start block must be {n} × p with 1 ≤ p ≤ {n}, got shape {tuple(start.shape)}.")
    found, products, steps, basis = _iterate(G, rank, tol, max_products, seed, max(1, step_products), start)
    if found is not None and start is not None:
        # a start holding exact eigenvectors of smaller eigenvalues passes the residual test at once (the bound
        # certifies eigenpairs, not that they are the largest): look for a larger one outside the result
        missed, made = _misses_a_larger_eigenvalue(G, found[1], float(found[0][-1]), tol * float(found[0].sum()), seed)
        products += made
        if missed:
            again, more, more_steps, basis = _iterate(G, rank, tol, max(1, max_products - products), seed,
                                                      max(1, step_products), None)
            found, products, steps = again, products + more, steps + more_steps
    if info is not None:
        info.update(products=products, steps=steps, basis=basis)
    return found


#: Random columns and products with ``G`` of the check a warm-started result gets (:func:`_misses_a_larger_eigenvalue`).
CHECK_COLUMNS, CHECK_PRODUCTS = 8, 4


def _misses_a_larger_eigenvalue(G: torch.Tensor, U: torch.Tensor, theta_r: float, slack: float,
                                seed: int) -> tuple[bool, int]:
    """``(whether G has an eigenvalue above θ_r outside span(U), products made)`` (in blocks of
    :func:`block_size` columns, as :func:`top_eigh` counts them): power steps from random columns
    on the part of ``G`` outside ``span(U)`` (``n × r`` orthonormal). A Rayleigh quotient there above ``θ_r`` (plus
    ``slack``, the result's error bound) proves such an eigenvalue: none can exceed that part's largest. One a few
    steps do not bring out lies close to ``θ_r``, and missing it costs little energy."""
    n = G.shape[0]
    cols = min(CHECK_COLUMNS, n - U.shape[1])
    if cols <= 0:
        return False, 0
    gen = torch.Generator(device=G.device)
    gen.manual_seed(seed + 1)

    def outside(X: torch.Tensor) -> torch.Tensor:
        return X - U @ (U.mT @ X)

    Z = _orthonormalize(outside(torch.randn((n, cols), generator=gen, dtype=G.dtype, device=G.device)))
    threshold = theta_r + slack + 1e-12 * abs(theta_r)
    q = block_size(n, U.shape[1])
    for made in range(1, CHECK_PRODUCTS + 1):
        GZ = outside(G @ Z)
        if float((Z * GZ).sum(0).max()) > threshold:
            return True, -(-made * cols // q)
        Z = _orthonormalize(GZ)
    return False, -(-CHECK_PRODUCTS * cols // q)


def _iterate(G: torch.Tensor, rank: int, tol: float, max_products: int, seed: int, step_products: int,
             start: torch.Tensor | None) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, int, int, torch.Tensor | None]:
    """:func:`top_eigh`'s iteration: ``(result or None, products with G, Rayleigh–Ritz steps, basis)``."""
    n = G.shape[0]
    q = block_size(n, rank)
    trace = float(torch.diagonal(G).sum())
    gen = torch.Generator(device=G.device)
    gen.manual_seed(seed)
    if start is None or start.shape[1] < q:  # random columns, one product with G (a filter of degree 1)
        V = G @ torch.randn((n, q - (0 if start is None else start.shape[1])), generator=gen,
                            dtype=G.dtype, device=G.device)
        if start is not None:
            V = torch.cat([start.to(V), V], dim=1)
        products = 1
    else:
        V, products = start.to(G), 0
    V = _orthonormalize(V)
    steps = 0
    if products >= max_products:  # no product left for a Rayleigh–Ritz step
        return None, products, steps, None
    while True:
        W = G @ V  # Rayleigh–Ritz on span(V) (wider than q only at a wide start: counted as such)
        products += -(-V.shape[1] // q)
        steps += 1
        T = V.mT @ W
        T = 0.5 * (T + T.mT)
        if HOST_RAYLEIGH_RITZ and T.device.type != "cpu":
            theta, Y = (t.to(T.device) for t in torch.linalg.eigh(T.cpu()))
        else:
            theta, Y = torch.linalg.eigh(T)
        theta, Y = theta.flip(0)[:q], Y.flip(1)[:, :q]
        U, GU = V @ Y, W @ Y
        k = min(rank + 1, q)
        res = torch.linalg.vector_norm(GU[:, :k] - U[:, :k] * theta[:k], dim=0).tolist()
        th = theta.tolist()
        rho = torch.tensor(res[:rank], dtype=torch.float64)
        # the gap Kato–Temple's bound divides by, from θ_r to a cautious estimate of λ_{r+1}: the
        # Ritz value θ_{r+1} is a lower bound of it, raised by its residual (an eigenvalue lies within
        # ρ_{r+1} of θ_{r+1}), so a poorly converged tail of the block does not make the gap look wide
        gap = th[rank - 1] - th[rank] - res[rank] if rank < q else 0.0
        err = torch.minimum(rho, rho * rho / gap) if gap > 0 else rho
        energy = sum(max(t, 0.0) for t in th[:rank])
        # relative to what a truncation leaves (its error), floored: a dominant top eigenvalue (an outlier
        # channel) made a bound relative to the kept energy loose against that tail
        if float(err.sum()) <= tol * max(trace - energy, TAIL_FLOOR * energy):
            return (theta[:rank], U[:, :rank]), products, steps, U
        if products >= max_products:
            break
        # T_m(2G/cut − 1) applied to the Ritz vectors by the three-term recurrence (T_1 from G·U),
        # repeated (re-orthonormalised in between) until the step has made `step_products`
        # products: a steep spectrum allows only low degrees, and a Rayleigh–Ritz step per product
        # would cost more than the products on a GPU (its small eigh is latency-bound). Nothing to
        # damp (the block reaches G's null space: a rank-deficient G): plain power steps.
        cut = th[-1]
        shifted = cut > 1e-12 * th[0]
        degree = _degree(th[0], th[rank - 1], cut) if shifted else 1
        c = 0.5 * cut
        X, GX, made = U, GU, 0
        while True:
            if shifted:
                prev, cur = X, (GX - c * X) / c
                for _ in range(max(1, min(degree, max_products - products)) - 1):
                    prev, cur = cur, (G @ cur - c * cur) * (2.0 / c) - prev
                    products += 1
            else:
                cur = GX
            made += degree
            X = _orthonormalize(cur)
            # the recurrence above stops one product short of the budget, kept for the Rayleigh–Ritz
            # check of what it made: another round (one product, then the recurrence) needs two more
            if made >= step_products or products >= max_products - 1:
                break
            GX = G @ X
            products += 1
        V = X
    return None, products, steps, None
