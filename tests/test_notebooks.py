"""The notebooks execute top to bottom (nbclient, a real kernel) on tiny settings."""

import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from pretrainx.scaling import fit as F
from pretrainx.scaling.results import append_result

from conftest import REPO

PLANTED = F.ChinchillaFit(E=1.2, A=80.0, B=300.0, alpha=0.4, beta=0.35)


def execute(name, monkeypatch, **env):
  for key, value in env.items():
    monkeypatch.setenv(key, str(value))
  book = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  NotebookClient(book, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  return "\n".join(out.get("text", "") for cell in book.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_trains_and_plots(tmp_path, monkeypatch):
  text = execute("quickstart.ipynb", monkeypatch, PRETRAINX_NOTEBOOK_OUT=tmp_path)
  assert "final validation loss" in text and "step 60:" in text
  assert os.path.exists(tmp_path / "notebook_quickstart" / "checkpoints" / "60")


@pytest.mark.slow
def test_scaling_notebook_fits_a_results_table(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  db = str(tmp_path / "results.sqlite")
  for i, c in enumerate(np.geomspace(1e15, 1e17, 3)):  # an IsoFLOP grid, 1% noise
    for n in np.geomspace(1e5, 1e7, 5):
      d = c / (6 * n)
      loss = float(PLANTED.predict(n, d) * np.exp(rng.normal(0, 0.01)))
      append_result(db, {"run": f"r{i}-{n:.0f}", "config_hash": f"{i}{n:.0f}", "N": n, "D": d,
                         "C": c, "train_loss": loss, "eval_loss": loss, "status": "done"})
  text = execute("scaling.ipynb", monkeypatch, PRETRAINX_RESULTS=db,
                 PRETRAINX_NOTEBOOK_OUT=tmp_path, PRETRAINX_BOOTSTRAP=4)  # 50 by default: 70 s
  assert "15 runs" in text and "compute-optimal: N* ∝ C^" in text and "IsoFLOP: N_opt" in text
  for png in ("nb_fit.png", "nb_extrapolation.png", "nb_isoflop.png"):
    assert (tmp_path / png).stat().st_size > 1000
