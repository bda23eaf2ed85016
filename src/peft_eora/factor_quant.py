"""Low-bit EoRA factors fitted to the activations: rebalance, rotate, then alternate GPTQ rounding.

Rounding ``A`` (``(r, in)``) and ``B`` (``(out, r)``) to int4 entry by entry ignores what the
layer computes, ``B·A·x``. :func:`fit_lowbit_factors` instead

1. moves most of each rank direction's size into ``A`` (:data:`BALANCE`): ``B`` has one scale per
   row across all ``r`` directions, ``A`` one per row and 16 inputs;
2. turns the pair by an orthogonal ``r × r`` rotation ``R`` (``B·R``, ``Rᵀ·A``: the same product).
   The rank directions differ in size, so unrotated the small ones round to nothing in ``B``'s
   rows; rotated, each is spread over all ``r`` columns (the unrotated pair is tried too);
3. rounds ``A``'s columns left to right, pushing each column's rounding error onto the columns
   not yet rounded through the inverse input covariance ``H⁻¹`` (GPTQ), each group's scale chosen
   among shrunk candidates (:data:`CLIP_GRID`);
4. refits ``B`` to the rounded ``Â`` (least squares under ``H`` towards the residual ``ΔW`` that
   ``B·A`` truncates, when given as ``target``, else towards ``B·A``) and rounds it the same way
   against ``Â·H·Âᵀ``, the covariance of what ``B`` multiplies;
5. alternates (:data:`FIT_ROUNDS`): ``A`` refitted to the rounded ``B̂``, rounded, ``B`` refitted
   and rounded again; the pair closest to the target under ``H`` is kept.

The grid is exactly :mod:`peft_eora.kernels.lowbit`'s (symmetric, float32 scales per row, or per
row and group for ``A``) and every group keeps one code at ``±qmax``, so a saved adapter re-derives
the same scales and stores these values bit for bit::

    >>> import torch
    >>> from peft_eora.factor_quant import fit_lowbit_factors
    >>> X = torch.randn(512, 64); H = X.T @ X
    >>> A, B = torch.randn(8, 64), torch.randn(32, 8)
    >>> A_hat, B_hat = fit_lowbit_factors(A, B, H, bits=4)
    >>> A_hat.shape, B_hat.shape
    (torch.Size([8, 64]), torch.Size([32, 8]))

Measured on SmolLM2-135M, GPTQ 3-bit, r = 128, int4 (held-out activation-weighted error lost to
rounding, as a share of the uncompensated error, 42 layers; WikiText-2 / GSM8K windows not used
for perplexity): entry by entry 4.0 %; one GPTQ pass, rotated (steps 2-3 without clipping) 1.84 %;
with clipped scales 1.44 %; rebalanced 1.32 %; ``B`` refitted 1.15 %; three rounds 0.86 %; ``A`` in
groups of 16 instead of 32 (:data:`~peft_eora.kernels.lowbit.INT4_A_GROUP`) 0.74 %.
WikiText-2 / GSM8K perplexity over float factors: +0.62 % / +0.83 % (entry by entry +3.1 % / +4.0 %;
``benchmarks/results/adapter_bits_fitted2_3bit.md``); 4-bit base −0.05 % / +0.11 %. At the logit-weighted
defaults, refits aimed at the float pair +0.86 % / +1.02 %, aimed at the residual (``target=``, what
:mod:`peft_eora.compensate` passes) +0.30 % / +0.15 %; 4-bit +0.17 % / −0.20 %
(``adapter_bits_target_{3,4}bit.md``).
"""

from __future__ import annotations

import math

import torch

from .decompose import (
    Covariance,
    CovarianceRoot,
    _block_len,
    _block_rows,
    _cholesky_,
    _symmetrize_,
    covariance_parts,
    damped,
)
from .kernels.lowbit import factor_group_size, grid_values

__all__ = ["gptq_round", "fit_lowbit_factors", "rank_rotation", "GPTQ_PERCDAMP", "CLIP_GRID", "FIT_ROUNDS", "BALANCE"]

#: Ridge added to the covariance before its Cholesky factorisation, relative to ``mean(diag H)``
#: (GPTQ's ``percdamp``): keeps the error feedback bounded along directions the data barely spans.
GPTQ_PERCDAMP = 0.01

_BLOCK = 128

#: Shrink factors tried for each group's scale (1 = the group's largest entry sets it). Measured on
#: SmolLM2-135M 3-bit r=128 int4, ``A`` in groups of 32 (held-out layer error lost, share of the
#: uncompensated error, 42 layers): 1.84 % with ``(1.0,)``, 1.44 % with this grid, 1.42 % with 13
#: steps down to 0.7.
CLIP_GRID: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)

#: Alternating rounds of :func:`fit_lowbit_factors` (``A`` rounded, ``B`` refitted and rounded, then
#: ``A`` refitted to the rounded ``B``, ...). Same measure: 1 round 1.15 %, 3 rounds 0.86 %, 5 0.82 %,
#: 8 0.79 %; with ``A`` in groups of 16: 2 rounds 0.79 %, 3 0.74 %, 5 0.70 %. Each round costs one
#: GPTQ pass over ``A`` and ``B``.
FIT_ROUNDS = 3

#: Share of each rank direction's size kept in ``B`` (``B = U·S^α``, ``A = S^(1−α)·…``; EoRA's own
#: split is 0.5). ``B`` has one scale per row over all ``r`` directions, ``A`` one per 16 inputs,
#: so ``A`` carries the spread better. Same measure (one round): α = 0.5 1.44 %, 0.3 1.34 %,
#: 0.2 1.32 %, 0.1 1.32 %, 0 1.35 %; with 3 rounds 0.1 / 0.2 / 0.3: 0.87 / 0.86 / 0.86 %.
BALANCE = 0.2


def _plan(H: Covariance | CovarianceRoot, percdamp: float, damping: float = 0.0) -> torch.Tensor:
    """GPTQ's float32 upper triangular ``U`` with ``Uᵀ·U = (H + percdamp·mean(diag H)·I)⁻¹``
    (computed in float64; dead inputs get 1): from one Cholesky factorisation of the reversed
    matrix, ``J·H·J = L·Lᵀ`` gives ``U = J·L⁻¹·J`` (``J`` reverses the order), with no explicit
    inverse of ``H``. ``H`` may be given as the parts it is the sum of or as a
    :class:`~peft_eora.decompose.CovarianceRoot`, and ``damping`` adds ``damping·mean(diag H)·I``
    first (:func:`~peft_eora.decompose.damped`'s values). A ridge too small to factorise is made
    ten times larger (at most five times).

    Memory: one ``n × n`` float64 matrix, then ``U``: the reversed covariance is built a block of
    rows at a time, factorised in place and inverted in place (:func:`_tril_inverse_`). At 14336²
    (a Llama-3-8B ``down_proj``) each avoided float64 temporary is 1.5 GiB.
    """
    Hr = _reversed_covariance(H, damping)
    diag = torch.diagonal(Hr).clone()
    mean = float(diag.flip(0).mean())  # summed in the order of the matrix before its reversal
    ridge = percdamp * (mean if mean > 0 else 1.0)
    for _ in range(6):
        torch.diagonal(Hr).copy_(diag + ridge)
        if _cholesky_(Hr):  # L over Hr's lower triangle (its strict upper one zeroed)
            break
        ridge *= 10.0
        del Hr  # a failed factorisation leaves a partial one: built again
        Hr = _reversed_covariance(H, damping)
    else:
        raise ValueError("the covariance is not positive definite even with a large ridge; check the calibration inputs")
    return _reversed(_tril_inverse_(Hr), torch.float32)


def _reversed_covariance(H: Covariance | CovarianceRoot, damping: float) -> torch.Tensor:
    """``J·(H + damping·mean(diag H)·I)·J`` as a new float64 matrix (symmetrised; dead inputs, a
    diagonal entry ≤ 0, get a unit row and column), a block of rows at a time."""
    if isinstance(H, CovarianceRoot):  # S·Sᵀ − shift·I
        n = H.S.shape[0]
        Hr = torch.empty((n, n), dtype=torch.float64, device=H.S.device)
        for i, j, rows in H.row_blocks():
            Hr[n - j:n - i] = rows.flip(0, 1)
        _symmetrize_(Hr)
        if H.shift:
            torch.diagonal(Hr).sub_(H.shift)
    else:
        first, *rest = covariance_parts(H)
        Hr = _reversed(first, torch.float64)
        for part in rest:
            _reversed(part, torch.float64, add_to=Hr)
        _symmetrize_(Hr)  # J·½(H + Hᵀ)·J = ½(Hr + Hrᵀ), the same sums
    if damping > 0:
        mean = float(torch.diagonal(Hr).flip(0).mean())  # summed in H's order, as damped() sums it
        if mean > 0:
            torch.diagonal(Hr).add_(damping * mean)
    dead = torch.diagonal(Hr) <= 0
    if bool(dead.any()):
        Hr[dead, :] = 0.0
        Hr[:, dead] = 0.0
        Hr[dead, dead] = 1.0
    return Hr


#: Columns per step of :func:`_tril_inverse_`.
_INVERSE_BLOCK = 256


def _tril_inverse_(L: torch.Tensor) -> torch.Tensor:
    """``L⁻¹`` written over the lower triangular ``L`` (its strict upper triangle zero), a block of
    columns at a time from the last: with ``L = [[D, 0], [X, L₂]]`` and ``L₂`` already inverted in
    place, ``L⁻¹ = [[D⁻¹, 0], [−L₂⁻¹·X·D⁻¹, L₂⁻¹]]`` (LAPACK's ``trtri``, which torch does not
    expose). Scratch: a block column."""
    n = L.shape[0]
    for j in reversed(range(0, n, _INVERSE_BLOCK)):
        k = min(j + _INVERSE_BLOCK, n)
        D = L[j:k, j:k]
        D_inv = torch.linalg.solve_triangular(D, torch.eye(k - j, dtype=L.dtype, device=L.device), upper=False)
        if k < n:
            X = L[k:, j:k]
            X.copy_((L[k:, k:] @ X) @ D_inv).neg_()
        D.copy_(D_inv)
    return L


def _reversed(M: torch.Tensor, dtype: torch.dtype, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """``J·M·J`` (rows and columns in reverse order) as a new row-major ``dtype`` matrix, or added
    to ``add_to``, a block of rows at a time (a whole-matrix ``flip`` and ``to`` would each make a
    full copy)."""
    rows, cols = M.shape
    out = torch.empty((rows, cols), dtype=dtype, device=M.device) if add_to is None else add_to
    step = _block_rows(out)
    for i in range(0, rows, step):
        j = min(i + step, rows)
        block = M[rows - j:rows - i].flip(0, 1)
        if add_to is None:
            out[i:j] = block
        else:
            out[i:j].add_(block.to(out))
    return out


def gptq_round(W: torch.Tensor, H: torch.Tensor | None, bits: int, group_size: int = 0,
               percdamp: float = GPTQ_PERCDAMP, plan: torch.Tensor | None = None,
               clip: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """``W`` (``(rows, cols)``, inputs along the columns) rounded onto the symmetric ``bits`` grid of
    :func:`~peft_eora.kernels.lowbit.quantize_per_channel` (a scale per row, or per row and
    ``group_size`` columns) so that ``‖(W − Ŵ)·Xᵀ‖`` is small for inputs with covariance ``H``
    (``(cols, cols)``): GPTQ's column-by-column rounding with error feedback, each group's scale
    taken from its entries as updated when the group starts: ``max|w|·f / qmax`` with the ``f`` of
    ``clip`` that rounds the group closest (squared error weighted by ``diag H``; clipping the few
    largest entries buys a finer step for the rest). Each group's largest entry keeps its top code,
    so re-quantizing the result (float32 grid values) gives back the same codes and scales.
    ``plan`` (``_plan(H, percdamp)``) shares the factorisation between matrices with one input.
    ``H=None`` stands for the identity: nothing to feed back, each entry rounded to the nearest
    code of its group's clipped scale (no ``n × n`` matrix is made).

        >>> W_hat = gptq_round(W, X.T @ X, bits=4, group_size=32)  # doctest: +SKIP

    (GPTQ's act-order, the loudest inputs first with fixed group scales, lowered the held-out layer
    error ~10 % on SmolLM2-135M but not the perplexity at r=128 int4: 3-bit 51.67 / 8.251 against
    51.50 / 8.184 in this order, 4-bit 38.57 / 6.381 against 38.66 / 6.376; not adopted.)
    """
    rows, cols = W.shape
    if H is not None and H.shape != (cols, cols):
        raise ValueError(f"covariance shape {tuple(H.shape)} does not match the {cols} input columns")
    if group_size and cols % group_size:
        raise ValueError(f"group_size={group_size} must divide the {cols} columns")
    qmax = float((1 << (bits - 1)) - 1)
    g = group_size if group_size else cols
    # float32 like the stored grid (and GPTQ). The loop is one small update per column, so it runs on
    # the transpose: each input column is one contiguous row, updated in place with few kernel calls.
    Wt = W.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # updated in place below
    if H is None:
        weight = torch.ones(cols, dtype=torch.float32, device=Wt.device)
        for c in range(0, cols, g):
            cur = Wt[c:c + g]
            scale, lo, hi = _group_grid(cur.T, qmax, weight[c:c + g], clip)
            q = cur.div_(scale).round_()
            torch.maximum(q, lo, out=q)
            torch.minimum(q, hi, out=q)
            q.mul_(scale)
        return _on_grid(Wt.T.contiguous(), bits, group_size)
    U = _plan(H.to(Wt.device), percdamp) if plan is None else plan
    u_diag = torch.diagonal(U).tolist()
    weight = torch.diagonal(H).to(Wt.device, torch.float32).clamp_min(0.0)
    out = torch.empty_like(Wt)
    block = max(_BLOCK // g, 1) * g if g <= _BLOCK else _BLOCK
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = Wt[i1:i2].clone()
        Err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if c % g == 0:  # a new group: its scale from the entries as updated so far
                end = min(c + g, cols)
                cur = (W1[i:i + end - c] if end <= i2 else torch.cat([W1[i:], Wt[i2:end]])).T
                scale, lo, hi = _group_grid(cur, qmax, weight[c:end], clip)
            w = W1[i]
            q = torch.div(w, scale, out=out[c]).round_()
            torch.maximum(q, lo[c % g], out=q)
            torch.minimum(q, hi[c % g], out=q)
            q.mul_(scale)
            err = torch.sub(w, q, out=Err[i]).div_(u_diag[c])
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1.0)
    return _on_grid(out.T.contiguous(), bits, group_size)


def _group_grid(cur: torch.Tensor, qmax: float, weight: torch.Tensor,
                clip: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one group (``cur``: ``(rows, group)``, its entries as the group starts): the per-row
    scale of :func:`_clip_scale` and per-entry code bounds ``(lo, hi)`` (``(group, rows)``). The
    group's largest entry keeps the top code (its sign as the group starts), so the scale
    re-derives exactly: its bounds are equal."""
    amax, arg = cur.abs().max(dim=1)
    scale = _clip_scale(cur, amax, qmax, weight, clip)
    top = (torch.nn.functional.one_hot(arg, cur.shape[1]).bool() & (amax > 0)[:, None]).T
    sign = torch.where(cur.T >= 0, qmax, -qmax)
    return scale, torch.where(top, sign, -qmax), torch.where(top, sign, qmax)


def _clip_scale(cur: torch.Tensor, amax: torch.Tensor, qmax: float, weight: torch.Tensor,
                clip: tuple[float, ...]) -> torch.Tensor:
    """Per row of ``cur`` (one group), the scale ``amax·f/qmax`` (``f`` in ``clip``) whose rounding
    error, weighted by ``weight`` per column, is smallest; 1 for all-zero rows."""
    best_scale, best_err = None, None
    for f in clip:
        scale = torch.where(amax > 0, amax * (f / qmax), torch.ones_like(amax))
        err = (((cur / scale[:, None]).round_().clamp_(-qmax, qmax) * scale[:, None] - cur).square_() * weight).sum(1)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    assert best_scale is not None
    return best_scale


def _on_grid(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``values`` through the store's quantize → dequantize until it is a fixed point (float32 ulps)."""
    for _ in range(3):
        again = grid_values(values, bits, group_size)
        if torch.equal(again, values):
            break
        values = again
    return values


def rank_rotation(r: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """An orthogonal ``r × r`` matrix that spreads each rank direction over all of them: the
    normalised Walsh–Hadamard matrix when ``r`` is a power of two, else the orthonormal DCT-II.

        >>> R = rank_rotation(8); bool(torch.allclose(R @ R.T, torch.eye(8, dtype=R.dtype)))
        True
    """
    if r > 0 and r & (r - 1) == 0:
        R = torch.ones(1, 1, dtype=torch.float64)
        while R.shape[0] < r:
            R = torch.cat([torch.cat([R, R], 1), torch.cat([R, -R], 1)], 0)
        R = R / math.sqrt(r)
    else:
        k = torch.arange(r, dtype=torch.float64)
        R = torch.cos(math.pi / r * (k[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / r)
        R[0] /= math.sqrt(2.0)
        R = R.T  # columns are the DCT basis vectors
    return R.to(device=device, dtype=dtype)


def fit_lowbit_factors(A: torch.Tensor, B: torch.Tensor, H: Covariance | CovarianceRoot | None, bits: int,
                       percdamp: float = GPTQ_PERCDAMP, rounds: int = FIT_ROUNDS, balance: float = BALANCE,
                       clip: tuple[float, ...] = CLIP_GRID,
                       target: torch.Tensor | None = None, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â, B̂)`` on the ``bits`` grid that :func:`~peft_eora.adapter_quant.pack_adapter_state_dict`
    stores, fitted so that ``B̂·Â·x`` stays close to ``B·A·x`` for inputs with covariance ``H``
    (``None``: identity). ``A`` is ``(r, in)``, ``B`` ``(out, r)``.

    The pair is first rebalanced (rank direction ``j`` of size ``σ_j = ‖b_j‖·‖a_j‖_H`` keeps
    ``σ_j^balance`` in ``B``), then both the pair turned by :func:`rank_rotation` and the pair as it
    is are rounded: ``Â`` by GPTQ against ``H``, ``B`` refitted to ``Â`` (least squares towards
    ``B·A`` under ``H``) and rounded against ``Â·H·Âᵀ``. The closer of the two (under ``H``) goes on
    for ``rounds − 1`` more rounds, each refitting ``A`` to the rounded ``B`` (``B̂⁺·B·A``) and
    ``B`` to the new ``Â``; the closest pair seen is returned (on SmolLM2-135M's EoRA factors the
    rotated pair won in every layer sampled).

    ``target`` (``(out, in)``, e.g. the residual ``ΔW`` that ``B·A`` truncates): the refits and the
    choice of the closest pair aim at ``target`` instead of ``B·A``, i.e. minimise
    ``‖(target − B̂·Â)·Xᵀ‖``, the layer's error itself; the rounded pair may then pick up some
    of what the rank-r truncation left out, where aiming at ``B·A`` only chases the float pair.

    ``H`` may also be the parts it is the sum of (or a :class:`~peft_eora.decompose.CovarianceRoot`),
    and ``damping`` fits to ``H + damping·mean(diag H)·I`` (the ridge the factors were fitted with),
    made here: beyond its inputs the fit holds one ``in × in`` float64 matrix and GPTQ's float32
    plan (the plan made first, in place; a damped matrix passed in would be one float64 matrix more).

        >>> A_hat, B_hat = fit_lowbit_factors(A, B, X.T @ X, bits=4)  # doctest: +SKIP
        >>> A_hat, B_hat = fit_lowbit_factors(A, B, X.T @ X, bits=4, target=dW)  # doctest: +SKIP
        >>> A_hat, B_hat = fit_lowbit_factors(A, B, (H_fit, H_val), bits=8, damping=0.01)  # doctest: +SKIP
    """
    r, n = A.shape
    if B.shape[1] != r:
        raise ValueError(f"incompatible shapes A={tuple(A.shape)}, B={tuple(B.shape)}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    if target is not None and tuple(target.shape) != (B.shape[0], n):
        raise ValueError(f"target shape {tuple(target.shape)} does not match B·A's {(B.shape[0], n)}")
    width = None if H is None else (H.S.shape[0] if isinstance(H, CovarianceRoot) else covariance_parts(H)[0].shape[0])
    if H is not None and width != n:
        raise ValueError(f"covariance of {width} inputs does not match A's {n} input columns")
    dev = A.device
    # no H: the identity, never built. Else the plan first, from the parts or the root's rows as given
    # (its float64 n × n matrix gone before the float64 H is made)
    plan = Hd = None
    if H is not None:
        if isinstance(H, CovarianceRoot):
            H = CovarianceRoot(H.S.to(dev), H.shift, None if H.scale is None else H.scale.to(dev))
        else:
            H = tuple(part.to(dev) for part in covariance_parts(H))
        plan = _plan(H, percdamp, damping)  # shared by every A rounding
        Hd = damped(H, damping)  # float64, symmetrised
        del H  # copies moved to dev (a GPU's copies of a CPU covariance) go now

    def times_h(M: torch.Tensor) -> torch.Tensor:
        """``M·H`` (float32 ``M``: with ``H``'s columns in float32 a block at a time, the same values
        as one float32 copy of ``H``, which would be half an ``in × in`` float64 matrix more)."""
        if Hd is None or M.dtype == Hd.dtype:
            return M if Hd is None else M @ Hd
        out = M.new_empty((M.shape[0], n))
        step = _block_len(n, M.element_size())
        for j in range(0, n, step):
            out[:, j:j + step] = M @ Hd[:, j:j + step].to(M.dtype)
        return out

    A64, B64 = _balanced(A.to(torch.float64), B.to(dev, torch.float64), Hd, balance)
    a_group, b_group = factor_group_size("lora_A", bits, n), factor_group_size("lora_B", bits, r)
    # the target in float32 like the layer's weights ((out, in) is the one large matrix here), and T·H
    T32 = None if target is None else target.to(dev, torch.float32)
    TH = None if T32 is None else times_h(T32)
    AH = times_h(A64)

    def aimed(A_hat: torch.Tensor) -> torch.Tensor:
        """``T·H·Âᵀ`` (``(out, r)``) for the target ``T`` (``B·A`` when none is given)."""
        return B64 @ (AH @ A_hat.T) if TH is None else (TH @ A_hat.T.to(torch.float32)).double()

    def toward(B_hat: torch.Tensor) -> torch.Tensor:
        """``B̂ᵀ·T`` (``(r, in)``)."""
        return (B_hat.T @ B64) @ A64 if T32 is None else (B_hat.T.to(torch.float32) @ T32).double()

    def finish(A_hat: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Refit ``B`` to the rounded ``A_hat`` (towards the target), round it; the pair's squared
        error under ``H`` towards the target, up to a constant: ``‖B̂·Â‖²_H − 2·⟨B̂, T·H·Âᵀ⟩``."""
        G = times_h(A_hat) @ A_hat.T  # the covariance of Â·x, which B multiplies
        G = 0.5 * (G + G.T)
        M = aimed(A_hat)
        B_fit = _ridge_solve(G, M.T).T  # argmin ‖(T − B'·Â)·X‖
        B_hat = gptq_round(B_fit, G, bits, b_group, percdamp, clip=clip).double()
        return float(((B_hat.T @ B_hat) * G).sum() - 2.0 * (B_hat * M).sum()), A_hat, B_hat

    R = rank_rotation(r, device=dev)
    pairs = [(R.T @ A64, B64 @ R), (A64, B64)]
    # both candidates' A share H: one GPTQ pass over their rows stacked
    A_hats = gptq_round(torch.cat([p[0] for p in pairs]), Hd, bits, a_group, percdamp, plan=plan, clip=clip)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for A_hat in A_hats.double().split(r):
        new = finish(A_hat)
        if best is None or new[0] < best[0]:
            best = new
    assert best is not None
    _, A_hat, B_hat = best
    for _ in range(rounds - 1):
        A_target = _ridge_solve(B_hat.T @ B_hat, toward(B_hat))  # argmin ‖T − B̂·A'‖ under any H: B̂⁺·T
        new = finish(gptq_round(A_target, Hd, bits, a_group, percdamp, plan=plan, clip=clip).double())
        if new[0] < best[0]:
            best = new
        A_hat, B_hat = new[1], new[2]
    return best[1].float(), best[2].float()


def _balanced(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor | None, balance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D⁻¹·A, B·D)`` with ``D`` diagonal so that direction ``j`` has ``‖b_j‖ = σ_j^balance``,
    ``σ_j = ‖b_j‖·‖a_j‖_H`` (the same product; zero directions untouched; ``H=None``: identity)."""
    b = B.norm(dim=0)
    a = (A.square().sum(1) if H is None else torch.einsum("ij,jk,ik->i", A, H, A)).clamp_min(0.0).sqrt()
    sigma = a * b
    ok = (b > 0) & (sigma > 0)
    d = torch.where(ok, sigma.clamp_min(1e-300) ** balance / b.clamp_min(1e-300), torch.ones_like(b))
    return A / d[:, None], B * d


def _ridge_solve(G: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``G⁻¹·M`` for a symmetric positive semi-definite ``G``, with a relative ridge of 1e-10 (a
    direction that rounded to nothing gets ``0``); all ``0`` when ``G`` is."""
    scale = float(torch.diagonal(G).mean()) if G.numel() else 0.0
    if not scale > 0:
        return torch.zeros_like(M)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + 1e-10 * scale * eye, M)

