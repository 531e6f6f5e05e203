"""Scaling-law fits on a sweep's results: the Chinchilla law, compute-optimal N*(C) and D*(C),
IsoFLOP profiles, the D-CPT mixture-ratio law, bootstrap intervals, a held-out check and plots.

Both parametric laws are sums of power laws, so log L̂ = logsumexp_k(X_k θ) with every term linear
in the log-space parameters θ; one fitter (Huber loss on log residuals, L-BFGS from the best points
of a grid of initialisations, as in Hoffmann et al. 2022) serves both.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import optimize, special

from pretrainx import storage
from pretrainx.metrics import save_figure
from pretrainx.scaling.results import load_results

CHINCHILLA_GRID = {  # initial values of (a=log A, b=log B, e=log E, alpha, beta)
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
# The search box of (a, b, e, alpha, beta): exponents are positive (loss falls with N and D;
# at 0 the compute optimum would not exist) and log-coefficients finite, so a resample with little
# signal cannot run off to overflowing coefficients.
CHINCHILLA_BOUNDS = ((-30.0, 100.0), (-30.0, 100.0), (-10.0, 10.0), (1e-3, 5.0), (1e-3, 5.0))


# ---------------------------------------------------------------------------------------------
# The generic fitter: log L̂ = LSE_k(X[k] @ θ), Huber loss on log L̂ - log L.


def _objective(theta: np.ndarray, X: np.ndarray, log_l: np.ndarray, delta: float):
  """Huber loss and its gradient. X: [terms, runs, params], theta: [params], log_l: [runs]."""
  z = X @ theta  # [terms, runs]
  pred = special.logsumexp(z, axis=0)  # [runs]
  r = pred - log_l
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
  w = np.exp(z - pred)  # softmax over terms: [terms, runs]
  dr = np.clip(r, -delta, delta)  # dHuber/dr: [runs]
  grad = np.tensordot(w * dr, X, axes=([0, 1], [0, 1]))  # [params]
  return loss, grad


def _grid_losses(thetas: np.ndarray, X: np.ndarray, log_l: np.ndarray, delta: float):
  """Huber loss of every grid point at once. thetas: [grid, params] -> [grid]."""
  z = np.einsum("knp,gp->gkn", X, thetas)
  r = special.logsumexp(z, axis=1) - log_l
  return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(-1)


def _fit_lse(X: np.ndarray, log_l: np.ndarray, inits: np.ndarray, delta: float,
             n_starts: int | None, warm: np.ndarray | None = None,
             bounds: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
  """L-BFGS from the n_starts best initialisations (all if None) and from warm; the best θ.

  bounds: (low, high) per parameter, or None for an unbounded search."""
  if n_starts is not None and n_starts < len(inits):
    order = np.argsort(_grid_losses(inits, X, log_l, delta), kind="stable")
    inits = inits[order[:n_starts]]
  if warm is not None:
    inits = np.concatenate([np.asarray(warm, np.float64)[None], inits])
  best, best_loss = None, np.inf
  for theta0 in inits:
    if bounds is not None:
      theta0 = np.clip(theta0, [lo for lo, _ in bounds], [hi for _, hi in bounds])
    res = optimize.minimize(_objective, theta0, args=(X, log_l, delta), jac=True,
                            method="L-BFGS-B", bounds=bounds, options={"maxiter": 3000, "ftol": 1e-15,
                                                        "gtol": 1e-12})
    if np.isfinite(res.fun) and res.fun < best_loss:
      best, best_loss = res.x, res.fun
  if best is None:
    raise ValueError("every L-BFGS start diverged; check that the losses are finite.")
  return best


def _check_runs(names: Sequence[str], arrays: Sequence[Any], n_params: int, law: str):
  out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
  n = len(out[0])
  for name, a in zip(names, out):
    if len(a) != n:
      raise ValueError(f"{law} fit: {name} has {len(a)} values but {names[0]} has {n}; give one "
                       "value per run.")
    bad = ~(np.isfinite(a) & (a > 0))
    if bad.any():
      raise ValueError(f"{law} fit: {name} must be positive and finite, got {a[bad][:5].tolist()} "
                       f"at runs {np.flatnonzero(bad)[:5].tolist()}; drop failed runs first.")
  if n < n_params:
    raise ValueError(f"{law} fit needs at least {n_params} runs (one per parameter), got {n}; run "
                     "a larger sweep.")
  return out


# ---------------------------------------------------------------------------------------------
# Chinchilla: L(N, D) = E + A / N^alpha + B / D^beta.


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def predict(self, N, D) -> np.ndarray:
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return self.E + self.A / N**self.alpha + self.B / D**self.beta

  @property
  def a(self) -> float:
    """Exponent of N*(C) ∝ C^a: beta / (alpha + beta)."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """Exponent of D*(C) ∝ C^b: alpha / (alpha + beta)."""
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))


def _chinchilla_design(N: np.ndarray, D: np.ndarray) -> np.ndarray:
  """X: [3 terms, runs, 5 params (a, b, e, alpha, beta)]."""
  X = np.zeros((3, len(N), 5))
  X[0, :, 0], X[0, :, 3] = 1.0, -np.log(N)  # a - alpha log N
  X[1, :, 1], X[1, :, 4] = 1.0, -np.log(D)  # b - beta log D
  X[2, :, 2] = 1.0  # e
  return X


def fit_chinchilla(N, D, L, *, huber_delta: float = 1e-3, grid: dict | None = None,
                   n_starts: int | None = 32, init: ChinchillaFit | None = None) -> ChinchillaFit:
  """Fits L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, approach 3).

  Minimises sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) over
  (a=log A, b=log B, e=log E, alpha, beta) with L-BFGS, started from the n_starts grid points
  with the lowest initial loss (every grid point if n_starts is None) and from `init` if given
  (a warm start, e.g. the full-data fit when bootstrapping), keeping the best optimum.
  """
  N, D, L = _check_runs(("N", "D", "L"), (N, D, L), 5, "Chinchilla")
  g = grid or CHINCHILLA_GRID
  inits = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
  warm = None if init is None else [math.log(init.A), math.log(init.B), math.log(init.E),
                                     init.alpha, init.beta]
  a, b, e, alpha, beta = _fit_lse(_chinchilla_design(N, D), np.log(L), inits, huber_delta,
                                  n_starts, warm, bounds=CHINCHILLA_BOUNDS)
  return ChinchillaFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                       beta=float(beta))


def at_search_bounds(fit: ChinchillaFit, rel: float = 1e-3) -> list[str]:
  """The parameters of `fit` that ended on an edge of CHINCHILLA_BOUNDS, as 'alpha = 5 (the
  upper bound)': the runs did not pin them down, and extrapolations from them mean little."""
  values = {"A": math.log(fit.A), "B": math.log(fit.B), "E": math.log(fit.E),
            "alpha": fit.alpha, "beta": fit.beta}
  out = []
  for (name, value), (low, high) in zip(values.items(), CHINCHILLA_BOUNDS):
    width = rel * (high - low)
    for edge, which in ((low, "lower"), (high, "upper")):
      if abs(value - edge) <= width:
        shown = f"{getattr(fit, name):.3g}" + (f" (log {edge:g})" if name in "ABE" else "")
        out.append(f"{name} = {shown} (the {which} bound of the search)")
  return out


def compute_optimal(fit: ChinchillaFit, C) -> tuple[np.ndarray, np.ndarray]:
  """(N*(C), D*(C)) minimising fit.predict under C = 6 N D.

  N* = G (C/6)^a and D* = (C/6)^b / G with G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta/(alpha+beta) (fit.a) and b = alpha/(alpha+beta) (fit.b).
  """
  c6 = np.asarray(C, np.float64) / 6.0
  return fit.G * c6**fit.a, c6**fit.b / fit.G


# ---------------------------------------------------------------------------------------------
# D-CPT: L(N, D, r) = E + A / N^alpha + B r^eta / D^beta + C / (r + eps)^gamma.


@dataclasses.dataclass(frozen=True)
class DCPTFit:
  """The D-CPT law (Que et al. 2024): L = E + A/N^alpha + B r^eta/D^beta + C/(r+eps)^gamma.

  r is the mixture ratio of the corpus whose loss is modelled (the domain corpus for the domain
  loss; use 1 - r for the general-corpus loss); eps is fixed, not fitted.
  """
  E: float
  A: float
  alpha: float
  B: float
  eta: float
  beta: float
  C: float
  gamma: float
  eps: float

  def predict(self, N, D, r) -> np.ndarray:
    N, D, r = (np.asarray(v, np.float64) for v in (N, D, r))
    return (self.E + self.A / N**self.alpha + self.B * r**self.eta / D**self.beta
            + self.C / (r + self.eps)**self.gamma)


def _dcpt_design(N, D, r, eps) -> np.ndarray:
  """X: [4 terms, runs, 8 params (e, a, alpha, b, eta, beta, c, gamma)]."""
  X = np.zeros((4, len(N), 8))
  X[0, :, 0] = 1.0  # e
  X[1, :, 1], X[1, :, 2] = 1.0, -np.log(N)  # a - alpha log N
  X[2, :, 3], X[2, :, 4], X[2, :, 5] = 1.0, np.log(r), -np.log(D)  # b + eta log r - beta log D
  X[3, :, 6], X[3, :, 7] = 1.0, -np.log(r + eps)  # c - gamma log(r + eps)
  return X


def fit_dcpt(N, D, r, L, *, eps: float = 0.01, huber_delta: float = 1e-3, n_grid: int = 4096,
             n_starts: int = 32, seed: int = 0) -> DCPTFit:
  """Fits the D-CPT law (see DCPTFit) like fit_chinchilla: Huber on log residuals, L-BFGS.

  The 8-dimensional initial grid is n_grid points drawn uniformly (seeded) from the box
  e∈[-1,1], a,b,c∈[0,25] (c∈[-5,5]), alpha,beta∈[0,2], eta∈[-1,2], gamma∈[0,2].
  """
  N, D, r, L = _check_runs(("N", "D", "r", "L"), (N, D, r, L), 8, "D-CPT")
  if (r > 1).any():
    raise ValueError(f"D-CPT fit: the mixture ratio r must lie in (0, 1], got max {r.max()}.")
  lo = np.array([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, -5.0, 0.0])
  hi = np.array([1.0, 25.0, 2.0, 25.0, 2.0, 2.0, 5.0, 2.0])
  inits = np.random.default_rng(seed).uniform(lo, hi, size=(n_grid, 8))
  e, a, alpha, b, eta, beta, c, gamma = _fit_lse(_dcpt_design(N, D, r, eps), np.log(L), inits,
                                                 huber_delta, n_starts)
  return DCPTFit(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), eta=float(eta),
                 beta=float(beta), C=math.exp(c), gamma=float(gamma), eps=eps)


# ---------------------------------------------------------------------------------------------
# Bootstrap and held-out check.


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  samples: dict[str, np.ndarray]  # parameter -> [n] refits
  intervals: dict[str, tuple[float, float]]  # parameter -> (low, high) percentile interval


def _params(fit) -> dict[str, float]:
  values = dataclasses.asdict(fit)
  for extra in ("a", "b"):  # derived exponents of ChinchillaFit
    if hasattr(fit, extra) and extra not in values:
      values[extra] = getattr(fit, extra)
  return {k: float(v) for k, v in values.items()}


def bootstrap(fit_fn: Callable[..., Any], data: Sequence[Any], n: int = 100, seed: int = 0,
              level: float = 0.95) -> Bootstrap:
  """Percentile intervals of every fitted parameter over n refits on runs resampled with
  replacement. data: the per-run arrays fit_fn takes positionally, e.g. (N, D, L)."""
  cols = [np.asarray(c) for c in data]
  rng = np.random.default_rng(seed)
  draws: dict[str, list[float]] = {}
  for _ in range(n):
    idx = rng.integers(0, len(cols[0]), len(cols[0]))
    for k, v in _params(fit_fn(*(c[idx] for c in cols))).items():
      draws.setdefault(k, []).append(v)
  q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
  samples = {k: np.array(v) for k, v in draws.items()}
  intervals = {k: tuple(float(x) for x in np.percentile(v, q)) for k, v in samples.items()}
  return Bootstrap(samples, intervals)


def heldout_check(N, D, L, k: int = 3, C=None, **fit_kwargs) -> dict[str, Any]:
  """Fits without the k largest-compute runs; their relative prediction errors (pred/L - 1)."""
  N, D, L = _check_runs(("N", "D", "L"), (N, D, L), 5 + k, "held-out Chinchilla")
  C = 6 * N * D if C is None else np.asarray(C, np.float64)
  order = np.argsort(C, kind="stable")
  train, test = order[:-k], order[-k:]
  fit = fit_chinchilla(N[train], D[train], L[train], **fit_kwargs)
  rel = fit.predict(N[test], D[test]) / L[test] - 1.0
  return {"fit": fit, "heldout_index": test.tolist(), "rel_error": rel.tolist(),
          "max_abs_rel_error": float(np.max(np.abs(rel)))}


# ---------------------------------------------------------------------------------------------
# IsoFLOP profiles (Hoffmann et al. approach 2).


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  budgets: np.ndarray  # [budgets] compute of each group (geometric mean of its runs)
  parabolas: np.ndarray  # [budgets, 3] L ≈ p0 x^2 + p1 x + p2, x = log N
  N_opt: np.ndarray  # [budgets]
  D_opt: np.ndarray  # [budgets]
  a: float  # N_opt ∝ C^a
  b: float  # D_opt ∝ C^b
  log_k: float  # N_opt = exp(log_k) C^a


def _group_budgets(C: np.ndarray, rtol: float) -> list[np.ndarray]:
  """Indices of runs whose compute lies within a factor (1 + rtol) of its sorted neighbour."""
  order = np.argsort(C, kind="stable")
  groups, current = [], [order[0]]
  for prev, i in zip(order[:-1], order[1:]):
    if C[i] > C[prev] * (1 + rtol):
      groups.append(np.array(current))
      current = []
    current.append(i)
  groups.append(np.array(current))
  return groups


def isoflop_fit(N, D, L, C=None, *, rtol: float = 0.05) -> IsoFlopFit:
  """One parabola in log N per compute budget, its minimum N_opt, and N_opt ∝ C^a over budgets.

  Runs are grouped by compute (within a factor 1 + rtol); groups with fewer than 3 distinct N or
  a parabola that opens downwards are skipped. Needs at least 2 usable budgets.
  """
  N, D, L = _check_runs(("N", "D", "L"), (N, D, L), 6, "IsoFLOP")
  C = 6 * N * D if C is None else _check_runs(("C",), (C,), 1, "IsoFLOP")[0]
  budgets, parabolas, n_opt, d_opt = [], [], [], []
  for idx in _group_budgets(C, rtol):
    if len(np.unique(N[idx])) < 3:
      continue
    p = np.polyfit(np.log(N[idx]), L[idx], 2)
    if p[0] <= 0:
      continue
    c = float(np.exp(np.mean(np.log(C[idx]))))
    n_star = float(np.exp(-p[1] / (2 * p[0])))
    flops_per_nd = float(np.median(C[idx] / (N[idx] * D[idx])))
    budgets.append(c)
    parabolas.append(p)
    n_opt.append(n_star)
    d_opt.append(c / (flops_per_nd * n_star))
  if len(budgets) < 2:
    raise ValueError(f"IsoFLOP fit needs >= 2 compute budgets with >= 3 model sizes each and a "
                     f"convex profile, found {len(budgets)}; sweep several sizes per budget.")
  budgets, n_opt, d_opt = np.array(budgets), np.array(n_opt), np.array(d_opt)
  a, log_k = np.polyfit(np.log(budgets), np.log(n_opt), 1)
  b = np.polyfit(np.log(budgets), np.log(d_opt), 1)[0]
  return IsoFlopFit(budgets, np.array(parabolas), n_opt, d_opt, float(a), float(b), float(log_k))


# ---------------------------------------------------------------------------------------------
# Plots (PNG, matplotlib Agg).


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(plt, fig, ax, path: str, legend_size: int) -> str:
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def plot_fit(N, D, L, fit: ChinchillaFit, path: str) -> str:
  """Loss against tokens, one colour per model size: the runs as points, the law as curves."""
  plt = _pyplot()
  N, D, L = (np.asarray(v, np.float64) for v in (N, D, L))
  fig, ax = plt.subplots(figsize=(6, 4))
  sizes = np.unique(N)
  colours = plt.cm.viridis(np.linspace(0, 1, len(sizes)))
  d_grid = np.geomspace(D.min() / 2, D.max() * 2, 100)
  for n, col in zip(sizes, colours):
    sel = N == n
    ax.scatter(D[sel], L[sel], color=col, s=14, label=f"N={n:.3g}")
    ax.plot(d_grid, fit.predict(n, d_grid), color=col, lw=1)
  ax.set(xscale="log", xlabel="tokens D", ylabel="loss",
         title=f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
  return _save(plt, fig, ax, path, legend_size=6)


def plot_isoflop(N, L, C, iso: IsoFlopFit, path: str, rtol: float = 0.05) -> str:
  """IsoFLOP profiles: runs and parabola per budget, and the optimum on each."""
  plt = _pyplot()
  N, L, C = (np.asarray(v, np.float64) for v in (N, L, C))
  fig, ax = plt.subplots(figsize=(6, 4))
  colours = plt.cm.plasma(np.linspace(0, 0.9, len(iso.budgets)))
  for c, p, n_star, col in zip(iso.budgets, iso.parabolas, iso.N_opt, colours):
    sel = np.abs(np.log(C / c)) <= np.log1p(rtol) * 2
    ax.scatter(N[sel], L[sel], color=col, s=14, label=f"C={c:.2g}")
    x = np.linspace(np.log(N[sel].min()), np.log(N[sel].max()), 100)
    ax.plot(np.exp(x), np.polyval(p, x), color=col, lw=1)
    ax.axvline(n_star, color=col, ls=":", lw=0.8)
  ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="loss",
         title=f"IsoFLOP profiles: N_opt ∝ C^{iso.a:.3f}")
  return _save(plt, fig, ax, path, legend_size=6)


def optimal_loss(fit: ChinchillaFit, C) -> np.ndarray:
  """The law's loss at the compute-optimal allocation for budget C."""
  n, d = compute_optimal(fit, C)
  return fit.predict(n, d)


def plot_extrapolation(C, L, fit: ChinchillaFit, boot: Bootstrap | None, target_C: float,
                       path: str, level: float = 0.95) -> str:
  """Compute-optimal loss L*(C) out to target_C with the bootstrap band, and the runs."""
  plt = _pyplot()
  C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
  grid = np.geomspace(C.min() / 2, max(target_C, C.max()) * 2, 200)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter(C, L, s=12, color="gray", label="runs")
  ax.plot(grid, optimal_loss(fit, grid), color="C0", label="compute-optimal L*(C)")
  if boot is not None:
    low, high = _band(boot, grid, level)
    ax.fill_between(grid, low, high, color="C0", alpha=0.25, label=f"{level:.0%} bootstrap")
  ax.axvline(target_C, color="C3", ls="--", lw=1,
             label=f"target C={target_C:.2g}: L*={float(optimal_loss(fit, target_C)):.4f}")
  ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss")
  return _save(plt, fig, ax, path, legend_size=7)


def _band(boot: Bootstrap, C, level: float) -> tuple[np.ndarray, np.ndarray]:
  """Pointwise percentile band of L*(C) over the bootstrap refits."""
  s = boot.samples
  curves = [optimal_loss(ChinchillaFit(*(s[k][i] for k in ("E", "A", "B", "alpha", "beta"))), C)
            for i in range(len(s["E"]))]
  q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
  low, high = np.percentile(np.array(curves), q, axis=0)
  return low, high


# ---------------------------------------------------------------------------------------------
# `python -m pretrainx fit RESULTS`


def _loss_column(rows: list[dict[str, Any]]) -> str:
  return "eval_loss" if all(r.get("eval_loss") is not None for r in rows) else "train_loss"


def fit_main(results_path: str, out_dir: str, *, target_compute: float | None = None,
             n_boot: int = 100, heldout: int = 3, seed: int = 0) -> str:
  """Fits every law the table supports, writes PNGs and fit.json to out_dir, returns a report."""

  rows = [r for r in load_results(results_path) if r.get("status") == "done"]
  if not rows:
    raise ValueError(f"results table {results_path} has no run with status 'done'.")
  col = _loss_column(rows)
  N, D, C, L = (np.array([float(r[k]) for r in rows]) for k in ("N", "D", "C", col))
  storage.check_bucket(out_dir, "write")
  storage.makedirs(out_dir)
  fit = fit_chinchilla(N, D, L)
  boot = bootstrap(lambda n, d, l: fit_chinchilla(n, d, l, n_starts=2, init=fit), (N, D, L),
                   n=n_boot, seed=seed)
  target = float(target_compute or 100 * C.max())
  n_t, d_t = compute_optimal(fit, target)
  low, high = _band(boot, np.array([target]), 0.95)
  lines = [f"{len(rows)} runs from {results_path} (loss: {col})",
           f"Chinchilla: L = E + A/N^alpha + B/D^beta"]
  for k, v in _params(fit).items():
    lo, hi = boot.intervals[k]
    lines.append(f"  {k:6s} = {v:.4g}   95% CI [{lo:.4g}, {hi:.4g}]")
  stuck = at_search_bounds(fit)
  if stuck:
    lines.append(f"  warning: {'; '.join(stuck)}: {len(rows)} runs do not pin the law down; add "
                 "runs over a wider range of N and D before trusting its extrapolation.")
  l_t = float(optimal_loss(fit, target))
  lines.append(f"compute-optimal: N* ∝ C^{fit.a:.3f}, D* ∝ C^{fit.b:.3f}; at C={target:.3g}: "
               f"N*={float(n_t):.3g}, D*={float(d_t):.3g}, L*={l_t:.4f} "
               f"[{low[0]:.4f}, {high[0]:.4f}]")
  report = {"chinchilla": _params(fit), "intervals": boot.intervals, "target_compute": target,
            "at_search_bounds": stuck,
            "plots": [plot_fit(N, D, L, fit, storage.join(out_dir, "fit.png")),
                      plot_extrapolation(C, L, fit, boot, target,
                                         storage.join(out_dir, "extrapolation.png"))]}
  lines += _optional_fits(rows, N, D, C, L, heldout, out_dir, report)
  storage.write_text(storage.join(out_dir, "fit.json"), json.dumps(report, indent=2))
  lines.append(f"plots and fit.json in {out_dir}")
  return "\n".join(lines)


def _optional_fits(rows, N, D, C, L, heldout, out_dir, report) -> list[str]:
  """IsoFLOP, held-out check and D-CPT where the table has what they need."""
  lines = []
  try:
    iso = isoflop_fit(N, D, L, C)
    report["isoflop"] = {"a": iso.a, "b": iso.b, "budgets": iso.budgets.tolist(),
                         "N_opt": iso.N_opt.tolist()}
    report["plots"].append(plot_isoflop(N, L, C, iso, storage.join(out_dir, "isoflop.png")))
    lines.append(f"IsoFLOP: N_opt ∝ C^{iso.a:.3f}, D_opt ∝ C^{iso.b:.3f} "
                 f"over {len(iso.budgets)} budgets")
  except ValueError as err:
    lines.append(f"IsoFLOP: skipped ({err})")
  if len(rows) >= 5 + heldout and heldout > 0:
    check = heldout_check(N, D, L, k=heldout, C=C)
    report["heldout"] = {k: v for k, v in check.items() if k != "fit"}
    lines.append(f"held-out: fit without the {heldout} largest-compute runs predicts them within "
                 f"{100 * check['max_abs_rel_error']:.2f}% (max |relative error|)")
  ratio = np.array([np.nan if r.get("ratio") is None else float(r["ratio"]) for r in rows])
  if np.isfinite(ratio).sum() >= 8:
    sel = np.isfinite(ratio)
    dcpt = fit_dcpt(N[sel], D[sel], ratio[sel], L[sel])
    report["dcpt"] = _params(dcpt)
    lines.append("D-CPT: " + ", ".join(f"{k}={v:.4g}" for k, v in _params(dcpt).items()))
  return lines
