"""Scaling-law fits on synthetic results from planted coefficients, and the results table."""

import json
import os
import sqlite3

import numpy as np
import pytest

from pretrainx.scaling import fit as F
from pretrainx.scaling.results import COLUMN_NAMES, append_result, load_results

TRUE = F.ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def chinchilla_runs(noise=0.002, seed=0, n=8):
  """An n x n grid of (N, D) with losses from TRUE times exp(noise * normal)."""
  rng = np.random.default_rng(seed)
  N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e10, n), np.geomspace(1e8, 1e12, n)))
  return N, D, TRUE.predict(N, D) * np.exp(rng.normal(0.0, noise, N.shape))


def isoflop_runs(noise=0.001, seed=0):
  """9 model sizes around the optimum at each of 5 compute budgets, D = C / (6 N)."""
  rng = np.random.default_rng(seed)
  N, C = [], []
  for c in np.geomspace(1e17, 1e21, 5):
    n_opt = F.compute_optimal(TRUE, c)[0]
    N += list(n_opt * np.geomspace(0.25, 4.0, 9))
    C += [c] * 9
  N, C = np.array(N), np.array(C)
  D = C / (6 * N)
  return N, D, TRUE.predict(N, D) * np.exp(rng.normal(0.0, noise, N.shape)), C


def test_chinchilla_recovers_planted_coefficients():
  fit = F.fit_chinchilla(*chinchilla_runs())
  for name in ("E", "A", "B", "alpha", "beta"):
    assert getattr(fit, name) == pytest.approx(getattr(TRUE, name), rel=0.05), name
  assert abs(fit.a - TRUE.a) < 0.02 and abs(fit.b - TRUE.b) < 0.02


def test_compute_optimal_closed_form_is_the_minimum():
  c = 1e22
  n_star, d_star = F.compute_optimal(TRUE, c)
  assert 6 * n_star * d_star == pytest.approx(c, rel=1e-9)
  n = n_star * np.geomspace(0.5, 2.0, 41)  # on the budget: D = C / (6 N)
  losses = TRUE.predict(n, c / (6 * n))
  assert np.argmin(losses) == 20  # the closed form sits at the minimum of the iso-compute line
  assert TRUE.a + TRUE.b == pytest.approx(1.0)
  n2, d2 = F.compute_optimal(TRUE, 10 * c)
  assert np.log10(n2 / n_star) == pytest.approx(TRUE.a)
  assert np.log10(d2 / d_star) == pytest.approx(TRUE.b)


def test_isoflop_recovers_optimal_exponent():
  N, D, L, C = isoflop_runs()
  iso = F.isoflop_fit(N, D, L, C)
  assert len(iso.budgets) == 5
  assert abs(iso.a - TRUE.a) < 0.02 and abs(iso.b - TRUE.b) < 0.02
  assert np.allclose(iso.N_opt, F.compute_optimal(TRUE, iso.budgets)[0], rtol=0.15)


def test_dcpt_recovers_planted_coefficients():
  true = F.DCPTFit(E=1.5, A=300.0, alpha=0.35, B=500.0, eta=0.5, beta=0.3, C=0.05, gamma=0.6,
                   eps=0.01)
  grids = (np.geomspace(1e6, 1e10, 5), np.geomspace(1e8, 1e12, 5), [0.05, 0.1, 0.2, 0.4, 0.7, 1.0])
  N, D, r = (a.ravel() for a in np.meshgrid(*grids))
  L = true.predict(N, D, r) * np.exp(np.random.default_rng(0).normal(0.0, 0.001, N.shape))
  fit = F.fit_dcpt(N, D, r, L, eps=0.01, n_starts=8)
  for name in ("E", "A", "alpha", "B", "eta", "beta", "C", "gamma"):
    assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=0.05), name


def test_bootstrap_intervals_contain_truth():
  data = chinchilla_runs(noise=0.003, seed=1)
  full = F.fit_chinchilla(*data)
  boot = F.bootstrap(lambda n, d, l: F.fit_chinchilla(n, d, l, n_starts=2, init=full), data, n=30,
                     seed=0)
  for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
    lo, hi = boot.intervals[name]
    assert lo < getattr(TRUE, name) < hi, (name, lo, hi)
    assert len(boot.samples[name]) == 30
  assert boot.intervals["alpha"][1] - boot.intervals["alpha"][0] < 0.1  # informative, not vacuous


def test_heldout_error_small_on_clean_data():
  N, D, L = chinchilla_runs(noise=0.0)
  check = F.heldout_check(N, D, L, k=4)
  assert len(check["rel_error"]) == 4
  assert check["max_abs_rel_error"] < 1e-3
  C = 6 * N * D
  assert set(check["heldout_index"]) == set(np.argsort(C)[-4:].tolist())


def test_fit_errors():
  N, D, L = chinchilla_runs()
  with pytest.raises(ValueError, match="at least 5 runs"):
    F.fit_chinchilla(N[:4], D[:4], L[:4])
  with pytest.raises(ValueError, match="L must be positive"):
    F.fit_chinchilla(N, D, np.where(np.arange(len(L)) == 3, -1.0, L))
  with pytest.raises(ValueError, match="N must be positive"):
    F.fit_chinchilla(np.where(np.arange(len(N)) == 0, 0.0, N), D, L)
  with pytest.raises(ValueError, match="one value per run"):
    F.fit_chinchilla(N, D[:-1], L)
  with pytest.raises(ValueError, match="at least 8 runs"):
    F.fit_dcpt(N[:7], D[:7], np.full(7, 0.5), L[:7])
  with pytest.raises(ValueError, match="2 compute budgets"):
    F.isoflop_fit(N, D, L, np.full(len(N), 1e20))  # one budget only


def _row(i, n, d, loss, **extra):
  return {"run": f"r{i}", "config_hash": f"h{i}", "N": int(n), "D": int(d), "C": 6.0 * n * d,
          "train_loss": float(loss), "eval_loss": float(loss), "status": "done",
          "domain_losses": {"web": float(loss), "code": float(loss) + 0.1},
          "bindings": [f"Run.steps = {i}"], "seconds": 1.5, **extra}


def test_results_round_trip(tmp_path):
  db = str(tmp_path / "sub" / "results.sqlite")
  rows = [_row(i, 1e6 * (i + 1), 1e8, 3.0 - 0.1 * i) for i in range(3)]
  rows[2]["train_loss"] = np.float32(2.5)  # numpy scalars are stored as plain numbers
  for row in rows:
    append_result(db, row)
  back = load_results(db)
  assert [r["run"] for r in back] == ["r0", "r1", "r2"]
  assert back[1]["domain_losses"] == {"web": 2.9, "code": pytest.approx(3.0)}
  assert back[2]["bindings"] == ["Run.steps = 2"] and back[0]["N"] == 1_000_000
  assert back[0]["ratio"] is None and set(back[0]) == set(COLUMN_NAMES)
  assert back[2]["train_loss"] == 2.5 and isinstance(back[2]["train_loss"], float)


def test_results_errors(tmp_path):
  missing = str(tmp_path / "nope.sqlite")
  with pytest.raises(FileNotFoundError, match="nope.sqlite"):
    load_results(missing)
  db = str(tmp_path / "empty.sqlite")
  append_result(db, _row(0, 1e6, 1e8, 3.0))
  with sqlite3.connect(db) as conn:
    conn.execute("DELETE FROM results")
  with pytest.raises(ValueError, match="empty.sqlite is empty"):
    load_results(db)
  assert load_results(db, allow_empty=True) == []
  bad = str(tmp_path / "bad.sqlite")
  with sqlite3.connect(bad) as conn:
    conn.execute("CREATE TABLE results (run TEXT, loss REAL)")
  with pytest.raises(ValueError, match="bad.sqlite is malformed.*missing"):
    load_results(bad)
  with pytest.raises(ValueError, match="malformed"):
    append_result(bad, _row(0, 1e6, 1e8, 3.0))
  garbage = tmp_path / "garbage.sqlite"
  garbage.write_bytes(b"not a database at all" * 100)
  with pytest.raises(ValueError, match="garbage.sqlite"):
    load_results(str(garbage))
  with pytest.raises(ValueError, match="unknown columns"):
    append_result(db, {**_row(0, 1e6, 1e8, 3.0), "los": 1.0})
  with pytest.raises(ValueError, match="lacks required"):
    append_result(db, {k: v for k, v in _row(0, 1e6, 1e8, 3.0).items() if k != "N"})


def test_fit_main_writes_report_and_plots(tmp_path):
  db = str(tmp_path / "results.sqlite")
  N, D, L, C = isoflop_runs()
  for i, (n, d, loss) in enumerate(zip(N, D, L)):
    append_result(db, _row(i, n, d, loss))
  append_result(db, {**_row(99, 1e6, 1e8, 9.0), "status": "failed"})  # ignored
  out = str(tmp_path / "fit")
  text = F.fit_main(db, out, n_boot=10, target_compute=1e23)
  assert "45 runs" in text and "IsoFLOP: N_opt" in text and "held-out" in text
  for name in ("fit.png", "extrapolation.png", "isoflop.png"):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
  with open(os.path.join(out, "fit.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["chinchilla"]["alpha"] == pytest.approx(TRUE.alpha, rel=0.05)
  assert abs(report["isoflop"]["a"] - TRUE.a) < 0.02


def test_a_fit_at_the_edge_of_its_search_box_is_flagged():
  """Loss that falls faster in N than any exponent the search allows (alpha 6 > 5): the fit
  stops at the bound, and says so instead of reporting alpha = 5 as a finding."""
  steep = F.ChinchillaFit(E=1.7, A=1e36, B=410.7, alpha=6.0, beta=0.28)
  N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 4), np.geomspace(1e8, 1e11, 4)))
  fit = F.fit_chinchilla(N, D, steep.predict(N, D), n_starts=4)
  assert fit.alpha == pytest.approx(5.0, rel=1e-3)
  assert any(s.startswith("alpha = 5 (the upper bound") for s in F.at_search_bounds(fit))
  assert F.at_search_bounds(TRUE) == []
