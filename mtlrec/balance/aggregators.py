"""The gradient-surgery rules as pure functions of the task gradients' Gram matrix.

Every rule here returns coefficients ``c`` ([T], float64) such that the combined update is
``sum_t c_t g_t``: projections (PCGrad, GradVac), min-norm and bargaining solutions (MGDA,
Nash-MTL), the CAGrad dual, IMTL-G and Aligned-MTL all produce linear combinations of the original
task gradients, and everything they need is inner products between them. Working on the [T, T]
Gram matrix ``M = G G^T`` keeps the D-sized work to one matmul per step and makes each rule easy to
check by hand (see tests/test_balance.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

EPS = 1e-12


def _normalised(gram: torch.Tensor) -> torch.Tensor:
    """The Gram divided by its largest diagonal entry: every rule here is invariant to a common
    scale of the gradients, and this keeps the tolerances below meaningful for tiny gradients."""
    top = float(gram.diagonal().max()) if gram.numel() else 0.0
    return gram / top if top > 0 else gram


def on_present(
    rule: Callable[[torch.Tensor], torch.Tensor], gram: torch.Tensor, present: torch.Tensor | None
) -> torch.Tensor:
    """``rule``'s coefficients computed on the present tasks' Gram matrix only, as if the step
    had only them; an absent task (``present`` False, :mod:`mtlrec.balance.base`) gets 0."""
    if present is None or bool(present.all()):
        return rule(gram)
    idx = present.nonzero().flatten()
    coef = torch.zeros(gram.shape[0], dtype=torch.float64)
    if len(idx):
        coef[idx] = rule(gram[idx][:, idx]).to(coef)
    return coef


def pcgrad_coefficients(gram: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PCGrad (Yu et al., NeurIPS 2020, Alg. 1): for each task i, in a random order of the other
    tasks j, if g_i^PC . g_j < 0 then g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j, always against the
    ORIGINAL g_j; the update is sum_i g_i^PC."""
    gram = _normalised(gram)
    n = gram.shape[0]
    rows = torch.eye(n, dtype=gram.dtype)  # row i: g_i^PC in the basis of the original g_j
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i or gram[j, j] <= EPS:
                continue
            dot = rows[i] @ gram[:, j]
            if dot < 0:
                rows[i, j] -= dot / gram[j, j]
    return rows.sum(0)


def _two_point(v11: float, v12: float, v22: float) -> float:
    """argmin over gamma in [0, 1] of |gamma a + (1 - gamma) b|^2 given a.a, a.b, b.b."""
    denom = v11 + v22 - 2.0 * v12
    if denom <= EPS:
        return 1.0
    return min(max((v22 - v12) / denom, 0.0), 1.0)


def min_norm_coefficients(gram: torch.Tensor, iters: int = 250, tol: float = 1e-6) -> torch.Tensor:
    """MGDA's min-norm point of the convex hull of the task gradients (Sener & Koltun, NeurIPS
    2018, Alg. 2): the best pair in closed form, then Frank-Wolfe with exact line search."""
    m = _normalised(gram).cpu().numpy()
    n = m.shape[0]
    alpha = np.zeros(n)
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    best = math.inf
    for i in range(n):
        for j in range(i + 1, n):
            gamma = _two_point(m[i, i], m[i, j], m[j, j])
            cost = (
                gamma**2 * m[i, i] + 2 * gamma * (1 - gamma) * m[i, j] + (1 - gamma) ** 2 * m[j, j]
            )
            if cost < best:
                best = cost
                alpha[:] = 0.0
                alpha[i], alpha[j] = gamma, 1.0 - gamma
    for _ in range(iters):
        grad = m @ alpha
        t = int(np.argmin(grad))
        gamma = _two_point(float(alpha @ grad), float(grad[t]), float(m[t, t]))
        new = gamma * alpha
        new[t] += 1.0 - gamma
        done = np.abs(new - alpha).sum() < tol
        alpha = new
        if done:
            break
    return torch.from_numpy(alpha)


def cagrad_coefficients(gram: torch.Tensor, c: float) -> torch.Tensor:
    """CAGrad (Liu et al., NeurIPS 2021, Alg. 1): w* = argmin_{w in simplex} g_w . g_0 +
    sqrt(phi) |g_w| with g_0 the mean gradient and phi = c^2 |g_0|^2; the update is
    g_0 + sqrt(phi) / |g_w*| g_w* (before the authors' rescaling, which the caller applies).
    With one task the simplex is w = 1, so the update is (1 + c) g, as the authors' code gives."""
    n = gram.shape[0]
    mean = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if c == 0.0:
        return mean
    scale = float(gram.diagonal().mean())
    if scale <= EPS:
        return mean
    a = (gram / scale).cpu().numpy()  # the argmin does not change when the Gram is rescaled
    b = mean.numpy()
    root_phi = c * math.sqrt(max(float(b @ a @ b), 0.0))
    w = np.ones(1) if n == 1 else _simplex_minimize(a, b, root_phi)
    gw_norm = math.sqrt(max(float(w @ a @ w), 0.0))
    return torch.from_numpy(b + root_phi / (gw_norm + 1e-8) * w)


def _simplex_minimize(a: np.ndarray, b: np.ndarray, root_phi: float) -> np.ndarray:
    from scipy.optimize import minimize  # scikit-learn's dependency; only CAGrad needs it

    n = a.shape[0]
    ab = a @ b

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        norm = math.sqrt(max(float(w @ a @ w), 0.0) + 1e-8)
        return float(w @ ab) + root_phi * norm, ab + root_phi * (a @ w) / norm

    result = minimize(
        objective,
        np.full(n, 1.0 / n),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=({"type": "eq", "fun": lambda w: 1.0 - w.sum(), "jac": lambda w: -np.ones(n)},),
    )
    w = np.clip(result.x, 0.0, None)
    return w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)


def gradvac_coefficients(
    gram: torch.Tensor, targets: torch.Tensor, beta: float, generator: torch.Generator
) -> torch.Tensor:
    """Gradient Vaccine (Wang et al., ICLR 2021, Alg. 1). For each task i and each other task j
    in random order, with phi = cos(g_i', g_j) and the EMA target phi_hat: if phi < phi_hat,
    g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 -
    phi_hat^2)) g_j; then phi_hat = (1 - beta) phi_hat + beta phi. Updates ``targets`` in place;
    the update is sum_i g_i'."""
    gram = _normalised(gram)
    n = gram.shape[0]
    rows = torch.eye(n, dtype=gram.dtype)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i or gram[j, j] <= EPS:
                continue
            norm_i = math.sqrt(max(float(rows[i] @ gram @ rows[i]), 0.0))
            norm_j = math.sqrt(float(gram[j, j]))
            if norm_i <= EPS:
                continue
            phi = float(rows[i] @ gram[:, j]) / (norm_i * norm_j)
            phi = min(max(phi, -1.0), 1.0)
            target = float(targets[i, j])
            if phi < target:
                root_t = math.sqrt(max(1.0 - target**2, 0.0))
                gain = target * math.sqrt(1.0 - phi**2) - phi * root_t
                rows[i, j] += norm_i * gain / (norm_j * root_t + 1e-8)
            targets[i, j] = (1.0 - beta) * target + beta * phi
    return rows.sum(0)


def imtl_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al., ICLR 2021, Sec. 3.2, closed form): with u_t = g_t / |g_t|,
    D = [g_1 - g_t]_{t>=2}, U = [u_1 - u_t]_{t>=2}: alpha_{2:T} = g_1 U^T (D U^T)^-1,
    alpha_1 = 1 - sum(alpha_{2:T}); then g = sum alpha_t g_t has equal projections on every u_t."""
    gram = _normalised(gram)
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(EPS)
    p = gram / norms  # p[a, b] = g_a . u_b
    dmat = p[0, 0] - p[0, 1:].unsqueeze(0) - p[1:, 0].unsqueeze(1) + p[1:, 1:]  # (g1-gi).(u1-uj)
    rhs = p[0, 0] - p[0, 1:]  # g1 . (u1 - uj)
    rest = rhs @ torch.linalg.pinv(dmat)
    return torch.cat([(1.0 - rest.sum()).reshape(1), rest])


def nash_coefficients(
    gram: torch.Tensor, start: torch.Tensor | None = None, iters: int = 50, ridge: float = 1e-6
) -> torch.Tensor:
    """Nash-MTL's bargaining solution (Navon et al., ICML 2022, Alg. 1): alpha > 0 with
    G^T G alpha = 1 / alpha on the RAW Gram matrix, so that |G alpha| = sqrt(T) at any gradient
    scale (alpha_t (G^T G alpha)_t = 1 for every t). The authors' code reaches the same point: its
    solver sees G^T G divided by its Frobenius norm n, and its constraint multiplies n back.

    The fixed point is found for the normalised M = G^T G / n (for conditioning), as the
    minimiser of the strictly convex f(a) = a^T M a / 2 - sum log a (its gradient is M a - 1/a),
    by damped Newton steps instead of the paper's sequence of cvxpy problems; then
    alpha = a / sqrt(n) solves the raw equation (G^T G a / sqrt(n) = sqrt(n) / a). A task without
    shared gradient gets alpha = 1 (it has no utility to bargain with); ``ridge`` (times I, on M)
    keeps M invertible when gradients are linearly dependent. ``start`` (a previous alpha, raw
    scale) warm-starts the solver."""
    n = gram.shape[0]
    alpha = torch.ones(n, dtype=torch.float64)
    active = _normalised(gram).diagonal() > 1e-10
    if not bool(active.any()):
        return alpha
    idx = active.nonzero().flatten()
    raw = gram.double().cpu()[idx][:, idx]
    frob = float(raw.norm())
    m = raw / frob + ridge * torch.eye(len(idx), dtype=raw.dtype)
    x = 1.0 / m.diagonal().sqrt()
    if start is not None and start.shape == (n,) and bool((start[idx] > 0).all()):
        x = start[idx].double() * math.sqrt(frob)

    def f(v: torch.Tensor) -> float:
        return float(0.5 * v @ m @ v - v.log().sum())

    for _ in range(iters):
        grad = m @ x - 1.0 / x
        if float(grad.abs().max()) < 1e-10:
            break
        hess = m + torch.diag(1.0 / x**2)
        step = torch.linalg.solve(hess, -grad)
        t, fx = 1.0, f(x)
        while t > 1e-10:
            new = x + t * step
            if bool((new > 0).all()) and f(new) <= fx + 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        x = x + t * step
    alpha[idx] = x / math.sqrt(frob)
    return alpha


def aligned_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL (Senushkin et al., CVPR 2023, Alg. 1): with the eigendecomposition
    G^T G = V diag(lambda) V^T (rank r, tolerance as numpy's matrix_rank), the aligned gradient
    matrix is G B with B = sqrt(lambda_min) V diag(lambda^-1/2) V^T; equal task weights give
    the update G B 1, so the coefficients are B 1."""
    n = gram.shape[0]
    lam, vec = torch.linalg.eigh(gram)
    tol = float(lam.max()) * n * torch.finfo(torch.float32).eps
    keep = lam > max(tol, EPS)
    if not bool(keep.any()):
        return torch.zeros(n, dtype=torch.float64)
    lam, vec = lam[keep], vec[:, keep]
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    return b.sum(1)
