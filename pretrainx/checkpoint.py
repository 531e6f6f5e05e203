"""Orbax checkpoints of the train state, with the run's gin config and last metrics beside it.

Layout: RUN_DIR/checkpoints/<step>/{state, meta}. `save` writes one step; `restore` reads the
latest (or a given) step into a sharded abstract state, so a restore lands directly in place.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


def _manager(directory: str, create: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def latest_step(directory: str) -> int | None:
  """Newest finalised step in `directory`, or None when there is none."""
  if not os.path.isdir(directory):
    return None
  with _manager(directory, create=False) as mngr:
    return mngr.latest_step()


def save(directory: str, step: int, state: Any, meta: dict[str, Any]) -> str:
  """Writes `state` (any pytree of arrays, sharded or not) and JSON `meta` as `step`; blocks."""
  with _manager(directory, create=True) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()
  return os.path.join(directory, str(step))


def restore(directory: str, abstract_state: Any, step: int | None = None
            ) -> tuple[Any, dict[str, Any], int]:
  """-> (state placed by abstract_state's shardings, meta, step). Clear errors when missing."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"checkpoint directory {directory} does not exist; train first "
        "(python -m pretrainx train ...) or pass the --run_dir of a run that saved a checkpoint.")
  with _manager(directory, create=False) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"{directory} holds no finished checkpoint; train first or pass another --run_dir.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; it has {sorted(steps)}.")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"]), step


def read_meta(directory: str, step: int | None = None) -> dict[str, Any]:
  """The JSON metadata of a checkpoint, without reading any array."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist.")
  with _manager(directory, create=False) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
