"""Online domain reweighting: the host-side update rule and its state, in plain numpy.

The loop hands over each log interval's per-domain loss sums and token counts; every
`ReweightConfig.every_steps` steps the weights take an exponentiated-gradient step toward the
domains with the largest signal and are mixed with the stage's own weights (DoReMi, Xie et al.
2023). Each result is an entry (from_step, weights) of a history that MixtureSchedule applies
like an extra stage, so the batch at step k stays a pure function of (seed, stages, history, k).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pretrainx.config.data import ReweightConfig
from pretrainx.data.mixture import MixtureSchedule


def excess_loss_signal(ce: np.ndarray, tokens: np.ndarray, reference: Sequence[float]
                       ) -> np.ndarray:
  """max(mean loss - reference, 0) per domain from loss sums and token counts [points, domains];
  a domain without tokens in the window gets 0."""
  ce_sum, n = np.sum(ce, axis=0), np.sum(tokens, axis=0)
  mean = np.divide(ce_sum, n, out=np.zeros_like(ce_sum), where=n > 0)
  return np.where(n > 0, np.maximum(mean - np.asarray(reference, np.float64), 0.0), 0.0)


def loss_slope_signal(steps: np.ndarray, ce: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Minus the least-squares slope (per step) of each domain's mean loss over the points where
  it had tokens [points, domains]; a domain with fewer than two such points gets 0."""
  steps = np.asarray(steps, np.float64)
  out = np.zeros(ce.shape[1])
  for d in range(ce.shape[1]):
    seen = tokens[:, d] > 0
    x = steps[seen]
    if len(x) < 2 or np.ptp(x) == 0:
      continue
    y = ce[seen, d] / tokens[seen, d]
    xc = x - x.mean()
    out[d] = -float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
  return out


def exponentiated_step(weights: np.ndarray, signal: np.ndarray, base: np.ndarray,
                       learning_rate: float, smoothing: float) -> np.ndarray:
  """normalize(w * exp(lr * signal)), then (1 - smoothing) * that + smoothing * base."""
  with np.errstate(divide="ignore"):  # a domain weighted 0 stays at 0
    logits = np.log(np.maximum(weights, 0.0)) + learning_rate * np.asarray(signal, np.float64)
  finite = np.isfinite(logits)
  e = np.where(finite, np.exp(logits - np.max(logits[finite])), 0.0)
  w = e / e.sum()
  out = (1.0 - smoothing) * w + smoothing * base
  return out / out.sum()


def floats_to_json(values) -> list[str]:
  """Floats as float.hex strings: JSON that reads back bit for bit."""
  return [float(v).hex() for v in np.asarray(values, np.float64).ravel()]


def floats_from_json(values) -> np.ndarray:
  return np.asarray([float.fromhex(v) for v in values], np.float64)


class Reweighter:
  """The window of log intervals since the last update and the weight history it produced.

  `observe` takes one log interval (the loss sums and token counts of its steps, per domain);
  `update` turns the window into new weights, appends them to the history from `apply_at` on
  and hands the history to the schedule. `state` / `load` round-trip it all through JSON
  exactly (float.hex), for the checkpoint.
  """

  def __init__(self, cfg: ReweightConfig, domains: Sequence[str]):
    self.cfg, self.domains = cfg, tuple(domains)
    self.reference = np.asarray([float(cfg.reference_losses.get(d, 0.0)) for d in domains])
    self.window: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, ce sums, tokens)
    self.history: list[tuple[int, np.ndarray]] = []

  def observe(self, step: int, ce: np.ndarray, tokens: np.ndarray) -> None:
    """One log interval ending at `step`: per-domain loss sums and token counts."""
    ce, tokens = np.asarray(ce, np.float64), np.asarray(tokens, np.float64)
    if np.all(np.isfinite(ce)):  # a diverged interval tells nothing about the domains
      self.window.append((int(step), ce, tokens))
    horizon = int(step) - self.cfg.every_steps
    self.window = [p for p in self.window if p[0] > horizon]

  def due(self, step: int) -> bool:
    cfg = self.cfg
    return cfg.enabled and step > 0 and step >= cfg.start_step and step % cfg.every_steps == 0

  def signal(self) -> np.ndarray:
    if not self.window:
      return np.zeros(len(self.domains))
    steps = np.asarray([p[0] for p in self.window])
    ce, tokens = np.stack([p[1] for p in self.window]), np.stack([p[2] for p in self.window])
    if self.cfg.method == "excess_loss":
      return excess_loss_signal(ce, tokens, self.reference)
    return loss_slope_signal(steps, ce, tokens)

  def update(self, apply_at: int, schedule: MixtureSchedule) -> np.ndarray:
    """New weights from the window, used by the batches from `apply_at` on -> [domains].

    The step starts from the weights in effect just before `apply_at`, or from the stage's own
    weights when a new stage starts there; the window is emptied."""
    base = schedule.stage_weights(apply_at)
    same_stage = apply_at > 0 and schedule.stage_index(apply_at - 1) == schedule.stage_index(
        apply_at)
    current = schedule.weights_at(apply_at - 1) if same_stage else base
    new = exponentiated_step(current, self.signal(), base, self.cfg.learning_rate,
                             self.cfg.smoothing)
    self.history = [h for h in self.history if h[0] < apply_at] + [(int(apply_at), new)]
    self.window = []
    schedule.set_history(self.history)
    return new

  def state(self) -> dict[str, Any]:
    return {"history": [[s, floats_to_json(w)] for s, w in self.history],
            "window": [[s, floats_to_json(ce), floats_to_json(n)] for s, ce, n in self.window]}

  def load(self, state: Mapping[str, Any], schedule: MixtureSchedule) -> None:
    self.history = [(int(s), floats_from_json(w)) for s, w in state.get("history", [])]
    self.window = [(int(s), floats_from_json(ce), floats_from_json(n))
                   for s, ce, n in state.get("window", [])]
    schedule.set_history(self.history)
