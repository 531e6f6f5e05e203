"""Running lm-evaluation-harness tasks on a pretrainx model: `HarnessConfig` (gin), offline task
loading with a clear error per task, metrics as `harness/<task>/<metric>` and a JSON report.

Used by `pretrainx eval --harness_tasks=...` and, every HarnessConfig.every_steps, by the training
loop. Tasks come from lm-eval's registry or from local YAML files in its task format
(`include_path`), whose data are local files (e.g. `dataset_path: json`); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging

from pretrainx import storage
from pretrainx.sharding import batch_sharding, check_batch_divisible
from pretrainx.config import HarnessConfig

# Hugging Face libraries read these when lm-eval loads a task's data: stay offline.
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _task_manager(cfg: HarnessConfig, include_defaults: bool = True):
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel

  include = cfg.include_path
  if include is not None:
    if storage.is_remote(include):
      raise ValueError(f"HarnessConfig.include_path={include}: lm-eval reads task files from a "
                       "local directory; copy them here.")
    include = storage.resolve(include)
    if not storage.isdir(include):
      raise FileNotFoundError(f"HarnessConfig.include_path={include} is not a directory of "
                              "lm-eval task YAML files.")
  key = (include, include_defaults, _yaml_files(include))
  if key not in _MANAGERS:
    if len(_MANAGERS) >= 4:
      _MANAGERS.pop(next(iter(_MANAGERS)))
    _MANAGERS[key] = TaskManager(include_path=include, include_defaults=include_defaults)
  return _MANAGERS[key]


# lm-eval's TaskManager indexes every YAML file of its registry when made (about 13 s on a CPU
# host), which an in-loop harness paid at every evaluation: a process keeps the few it made. A
# manager holds only the index (names -> YAML paths); `load` reads each task's YAML anew, and a
# change to the include directory's list of files (or their times) makes a new one.
_MANAGERS: dict[tuple, Any] = {}


def _yaml_files(include: str | None) -> tuple:
  if include is None:
    return ()
  out = []
  for folder, _, names in os.walk(include):
    for name in names:
      if name.endswith((".yaml", ".yml")):
        st = os.stat(os.path.join(folder, name))
        out.append((os.path.join(folder, name), st.st_mtime_ns, st.st_size))
  return tuple(sorted(out))


def load_tasks(cfg: HarnessConfig, include_defaults: bool = True):
  """lm-eval's TaskManager, with each of cfg.tasks loaded once offline to check it: a clear error
  names a task that is unknown or whose data is not here. Without `include_defaults` it indexes
  only cfg.include_path (lm-eval's own registry takes seconds to index)."""
  for key, value in OFFLINE_ENV.items():
    os.environ.setdefault(key, value)
  manager = _task_manager(cfg, include_defaults)
  known = set(manager.all_tasks)
  for name in cfg.tasks:
    if name not in known:
      close = sorted(t for t in known if name.split("_")[0] in t)[:8]
      raise ValueError(f"unknown harness task {name!r}: not in lm-eval's registry"
                       f"{' or ' + cfg.include_path if cfg.include_path else ''}"
                       f"{' (similar: ' + ', '.join(close) + ')' if close else ''}; write a task "
                       "YAML and pass its directory as --harness_include / "
                       "HarnessConfig.include_path.")
    try:
      manager.load([name])
    except Exception as err:  # pylint: disable=broad-except  # datasets/hub errors vary
      first = str(err).splitlines()[0] if str(err) else type(err).__name__
      raise ValueError(f"harness task {name!r}: its data is not available offline ({first}). "
                       "Point the task's YAML at local files (dataset_path: json, "
                       "dataset_kwargs: {data_files: {test: /path/data.jsonl}}) and pass its "
                       "directory as --harness_include; nothing is downloaded.") from None
  return manager


def evaluate(lm, cfg: HarnessConfig, include_defaults: bool = True) -> dict[str, Any]:
  """Runs cfg.tasks on `lm` (a PretrainxLM or any lm-eval LM); returns lm-eval's results.
  Without `include_defaults`, the tasks come from cfg.include_path alone (load_tasks)."""
  import lm_eval  # pylint: disable=import-outside-toplevel

  manager = load_tasks(cfg, include_defaults)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=list(cfg.tasks), task_manager=manager, num_fewshot=cfg.num_fewshot,
      limit=cfg.limit,
      bootstrap_iters=0, log_samples=True, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
  return dict(results or {})


def metrics(results: dict[str, Any]) -> dict[str, float]:
  """{'harness/<task>/<metric>': value} of lm-eval's results (stderr and text left out; a
  filter other than 'none' is kept in the name: 'exact_match_strict-match')."""
  out = {}
  for task, values in results.get("results", {}).items():
    for key, value in values.items():
      metric, _, filt = key.partition(",")
      if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      if math.isfinite(float(value)):
        name = metric if filt in ("", "none") else f"{metric}_{filt}"
        out[f"harness/{task}/{name}"] = float(value)
  return out


def report(results: dict[str, Any], step: int | None) -> dict[str, Any]:
  """The JSON report: the step, lm-eval's results, configs and versions, and per-request
  samples (inputs, responses, metrics), made JSON-safe."""
  keep = {k: results.get(k) for k in ("results", "groups", "configs", "versions", "n-shot",
                                       "higher_is_better", "n-samples", "samples")}
  return json.loads(json.dumps({"step": step, **keep}, default=str))


def write_report(path: str, results: dict[str, Any], step: int | None) -> str:
  storage.write_text(path, json.dumps(report(results, step), indent=1, sort_keys=True))
  logging.info("harness report: %s", path)
  return path


def table(results: dict[str, Any]) -> str:
  from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel

  return make_table(results)


def harness_lm(rt, params: Any, cfg: HarnessConfig):
  """A PretrainxLM for a run's Runtime `rt` (its model, mesh and vocabulary) and `params`."""
  from pretrainx.harness.lm import make_lm  # pylint: disable=import-outside-toplevel

  exp = rt.exp
  rows = cfg.batch_rows or exp.run.global_batch_size
  check_batch_divisible(rows, rt.mesh, 1)
  return make_lm(rt.model, params, exp.data.vocabulary,
                 max_length=cfg.max_length or exp.run.seq_len, batch_rows=rows,
                 sharding=batch_sharding(rt.mesh), scope=rt.scope,
                 max_gen_toks=cfg.max_gen_toks, seed=cfg.seed)


def run_and_record(rt, params: Any, cfg: HarnessConfig, step: int, run_dir: str | None,
                   writer=None) -> tuple[dict[str, float], dict[str, Any]]:
  """Evaluates cfg.tasks; writes the metrics (to `writer`) and RUN_DIR/harness/step_N.json from
  process 0. Returns (metrics, lm-eval's results)."""
  import jax  # pylint: disable=import-outside-toplevel

  results = evaluate(harness_lm(rt, params, cfg), cfg)
  values = metrics(results)
  if jax.process_index() == 0:
    if writer is not None:
      writer.write(step, values)
    if run_dir is not None:
      write_report(storage.join(run_dir, "harness", f"step_{step:08d}.json"), results, step)
  return values, results
