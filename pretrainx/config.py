"""Run configuration: RunConfig, the Experiment bundle, gin parsing and the run directory layout.

An Experiment bundles frozen dataclasses (model, optimizer, mesh, data, run, ...) that notebooks
build directly. gin, imported only here and lazily, fills them from gin files; `experiment_to_gin`
writes any Experiment back as a gin file, which is the operative config saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any

from pretrainx import storage
from pretrainx.checkpoint import CheckpointConfig
from pretrainx.data.mixture import Stage, check_stages
from pretrainx.data.objectives import Denoiser, ObjectiveConfig
from pretrainx.data.pipeline import DataConfig
from pretrainx.data.tasks import CorpusTask, FileTask, MixtureSpec
from pretrainx.data.vocab import ByteVocabulary, HFTokenizerVocabulary
from pretrainx.ema import EmaConfig
from pretrainx.harness.runner import HarnessConfig
from pretrainx.linearize.convert import LinearizeConfig
from pretrainx.peft import LoraConfig
from pretrainx.model.config import ModelConfig
from pretrainx.optim import OptimizerConfig
from pretrainx.sharding import MeshConfig
from pretrainx.train.guard import GuardConfig
from pretrainx.train.init import InitConfig
from pretrainx.train.tuning import TuneConfig


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What one training run does.

  Attributes:
    run_dir: where config.gin, metrics.jsonl, tensorboard/, loss.png and checkpoints/ go.
    seed: parameter-initialisation seed (the data order has its own DataConfig.seed).
    steps: optimizer updates in total.
    global_batch_size / seq_len: rows per step across all hosts, tokens per row.
    microbatches: gradient accumulation; each update averages this many microbatches.
    z_loss: weight of the log(Z)^2 auxiliary loss (0 disables it).
    log_every: steps between metric reads (the only host syncs of the hot loop).
    eval_every: steps between validation passes (0: only at the end); eval_batches per pass
      (None: the whole validation split).
    peak_tflops: the MFU denominator for the whole job; None measures this machine's matmul peak.
    sample_prompt / sample_tokens: what the final sample continues and its length (0: no sample).
    progress_bar: show a tqdm bar on stderr.
    precision: a named policy that sets ModelConfig.param_dtype, ModelConfig.dtype and
      OptimizerConfig.state_dtype together: 'fp32', 'bf16_mixed' (fp32 params and optimizer
      state, bf16 compute) or 'bf16_pure' (all bf16; pair with OptimizerConfig.stochastic_rounding).
      None leaves the three fields as they are set.
  """

  run_dir: str = "runs/default"
  seed: int = 0
  steps: int = 100
  global_batch_size: int = 16
  seq_len: int = 128
  microbatches: int = 1
  z_loss: float = 1e-4
  log_every: int = 10
  eval_every: int = 0
  eval_batches: int | None = 16
  peak_tflops: float | None = None
  sample_prompt: str = "def "
  sample_tokens: int = 160
  sample_temperature: float = 0.7
  sample_top_k: int = 40
  progress_bar: bool = True
  precision: str | None = None


# policy -> (param_dtype, compute dtype, optimizer state dtype)
PRECISION_POLICIES = {
    "fp32": ("float32", "float32", "float32"),
    "bf16_mixed": ("float32", "bfloat16", "float32"),
    "bf16_pure": ("bfloat16", "bfloat16", "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  run: RunConfig = RunConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  guard: GuardConfig = GuardConfig()
  init: InitConfig = InitConfig()
  ema: EmaConfig = EmaConfig()
  tune: TuneConfig = TuneConfig()
  harness: HarnessConfig = HarnessConfig()

  def resolved(self) -> "Experiment":
    """The experiment with RunConfig.precision applied to the dtype fields it names."""
    name = self.run.precision
    if name is None:
      return self
    if name not in PRECISION_POLICIES:
      raise ValueError(f"RunConfig.precision={name!r}; choose one of {sorted(PRECISION_POLICIES)} "
                       "or None.")
    param, compute, state = PRECISION_POLICIES[name]
    return self.replace(model={"param_dtype": param, "dtype": compute},
                        optimizer={"state_dtype": state})

  def replace(self, **sections: dict[str, Any]) -> "Experiment":
    """exp.replace(run={'steps': 10}) -> a copy with those fields of those sections changed."""
    return dataclasses.replace(self, **{
        name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()})


# Gin files include others by repo-relative path ('gin_configs/models/tiny.gin').
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = (ModelConfig, OptimizerConfig, MeshConfig, DataConfig, RunConfig, CheckpointConfig,
            GuardConfig, InitConfig, EmaConfig, TuneConfig, HarnessConfig)
CONFIGURABLES = SECTIONS + (LoraConfig, ByteVocabulary, HFTokenizerVocabulary, Stage,
                            ObjectiveConfig, Denoiser, FileTask, CorpusTask, MixtureSpec,
                            LinearizeConfig)
# Sections whose change makes an existing run directory a different experiment.
IDENTITY_SECTIONS = ("model", "data")


def validate(exp: Experiment) -> None:
  """Cross-section checks that no single dataclass can make on its own."""
  exp = exp.resolved()
  run, model = exp.run, exp.model
  if run.seq_len > model.max_seq_len:
    raise ValueError(
        f"RunConfig.seq_len={run.seq_len} exceeds ModelConfig.max_seq_len={model.max_seq_len}; "
        "lower seq_len or raise max_seq_len.")
  vocab_size = exp.data.vocabulary.vocab_size
  if vocab_size > model.vocab_size:
    raise ValueError(
        f"the vocabulary has {vocab_size} ids but ModelConfig.vocab_size={model.vocab_size}; "
        f"set ModelConfig.vocab_size >= {vocab_size}.")
  if run.steps < 1 or run.global_batch_size < 1 or run.microbatches < 1:
    raise ValueError("RunConfig.steps, global_batch_size and microbatches must be positive.")
  check_stages(exp.data.schedule_stages, exp.data.domains)
  causal_only = sorted({i for i in model.layer_impls if i in ("linear", "hybrid")})
  if exp.data.uses_prefix_lm and causal_only:
    raise ValueError(
        f"a 'ul2' stage needs a bidirectional prefix, which attention_impl "
        f"{', '.join(map(repr, causal_only))} cannot give; use 'reference' or 'flash'.")


# ----------------------------------------------------------------------------------------------
# gin: registration, parsing with helpful errors, and writing an Experiment back out.


_GIN_SEARCH_PATHS: set[str] = set()
_GIN_CLASSES: dict[str, Any] = {}  # name -> gin-wrapped class (calling it applies the bindings)
_GIN_READERS: list[bool] = []


def register_gin_readers() -> None:
  """Lets gin read files (and includes) from buckets as well as from disk."""
  import gin  # pylint: disable=import-outside-toplevel

  if not _GIN_READERS:
    gin.config.register_file_reader(_open_remote, _is_remote_file)
    _GIN_READERS.append(True)


def _open_remote(path: str):
  return storage.open_file(path, "r")


def _is_remote_file(path: str) -> bool:
  return storage.is_remote(path) and storage.isfile(path)


def _gin():
  import gin  # pylint: disable=import-outside-toplevel

  register_gin_readers()
  for cls in CONFIGURABLES:
    if cls.__name__ not in _GIN_CLASSES:
      _GIN_CLASSES[cls.__name__] = gin.external_configurable(cls, name=cls.__name__,
                                                             module="pretrainx")
  return gin


def _known_bindings() -> list[str]:
  return [f"{cls.__name__}.{f.name}" for cls in CONFIGURABLES for f in dataclasses.fields(cls)]


def _explain_gin_error(err: Exception) -> str:
  text = str(err)
  hint = ""
  m = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", text)
  if m:
    close = difflib.get_close_matches(f"{m.group(1)}.{m.group(2)}", _known_bindings(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
  m = re.search(r"No configurable matching '([\w.]+)'", text)
  if m:
    names = [c.__name__ for c in CONFIGURABLES]
    close = difflib.get_close_matches(m.group(1).split(".")[-1], names, n=3)
    hint = f" Configurables are {', '.join(names)}." + (
        f" Did you mean {', '.join(close)}?" if close else "")
  return f"bad gin configuration: {text.splitlines()[0]}{hint}\n{text}"


def parse_gin(gin_files: list[str] | tuple[str, ...] = (), gin_params: list[str] | tuple[str, ...] = (),
              search_paths: tuple[str, ...] = ()) -> Experiment:
  """Reads gin files then `--gin_param` overrides into a validated Experiment."""
  return parse_gin_with(gin_files, gin_params, (), search_paths)[0]


def parse_gin_with(gin_files: list[str] | tuple[str, ...], gin_params: list[str] | tuple[str, ...],
                   extra: tuple[type, ...], search_paths: tuple[str, ...] = ()
                   ) -> tuple[Experiment, dict[str, Any]]:
  """parse_gin, plus the configurables `extra` (CONFIGURABLES that are not Experiment sections,
  e.g. LinearizeConfig) built from the same bindings: (experiment, {class name: object})."""
  gin = _gin()
  gin.clear_config()
  search_paths = (os.getcwd(), _REPO_ROOT, *search_paths)
  for path in search_paths:
    if path not in _GIN_SEARCH_PATHS:
      gin.add_config_file_search_path(path)
      _GIN_SEARCH_PATHS.add(path)
  for f in gin_files:
    if storage.is_remote(f):
      if not storage.isfile(f):
        raise FileNotFoundError(f"gin file {f} not found.")
    elif not os.path.exists(f) and not any(os.path.exists(os.path.join(p, f))
                                           for p in search_paths):
      raise FileNotFoundError(f"gin file {f} not found (looked relative to {os.getcwd()}).")
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_params))
    built = {cls.__name__: _GIN_CLASSES[cls.__name__]() for cls in SECTIONS}
    exp = Experiment(model=built["ModelConfig"], optimizer=built["OptimizerConfig"],
                     mesh=built["MeshConfig"], data=built["DataConfig"], run=built["RunConfig"],
                     checkpoint=built["CheckpointConfig"], guard=built["GuardConfig"],
                     init=built["InitConfig"], ema=built["EmaConfig"],
                     tune=built["TuneConfig"], harness=built["HarnessConfig"])
    extras = {cls.__name__: _GIN_CLASSES[cls.__name__]() for cls in extra}
  except (ValueError, TypeError, SyntaxError) as err:
    raise ValueError(_explain_gin_error(err)) from err
  finally:
    gin.clear_config()
  validate(exp)
  return exp, extras


def _gin_expr(value: Any, scope: str, lines: list[str]) -> str:
  """`value` as a gin expression; a nested dataclass becomes `@scope/Class()` and its fields are
  appended to `lines` as bindings in that scope, recursively."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    name = type(value).__name__
    for f in dataclasses.fields(value):
      expr = _gin_expr(getattr(value, f.name), f"{scope}_{f.name}", lines)
      lines.append(f"{scope}/{name}.{f.name} = {expr}")
    return f"@{scope}/{name}()"
  if isinstance(value, (tuple, list)):
    items = [_gin_expr(v, f"{scope}_{i}", lines) for i, v in enumerate(value)]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{k!r}: {_gin_expr(v, f'{scope}_{k}', lines)}"
                           for k, v in value.items()) + "}"
  return repr(value)


def experiment_to_gin(exp: Experiment) -> str:
  """Every field of every section as a gin binding; parse_gin of the text gives `exp` back.

  Nested configurables (the vocabulary, mixture stages, tasks, objectives) get a gin scope each.
  """
  lines = ["# Operative configuration written by pretrainx; load with --gin_file."]
  for section in dataclasses.fields(exp):
    obj = getattr(exp, section.name)
    nested: list[str] = []
    top = []
    for f in dataclasses.fields(obj):
      expr = _gin_expr(getattr(obj, f.name), f"{section.name}_{f.name}", nested)
      top.append(f"{type(obj).__name__}.{f.name} = {expr}")
    lines += [f"\n# {section.name}", *top, *nested]
  return "\n".join(lines) + "\n"


def config_differences(old: Experiment, new: Experiment,
                       sections: tuple[str, ...] = IDENTITY_SECTIONS) -> list[str]:
  """'Class.field: old -> new' for every differing field of the given sections."""
  out = []
  for name in sections:
    a, b = getattr(old, name), getattr(new, name)
    for f in dataclasses.fields(a):
      va, vb = getattr(a, f.name), getattr(b, f.name)
      if va != vb:
        out.append(f"{type(a).__name__}.{f.name}: {va!r} -> {vb!r}")
  return out


# ----------------------------------------------------------------------------------------------
# Run directory layout.


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Where a run directory keeps each output."""

  root: str  # a local directory or a gs:// / s3:// prefix
  config: str  # the operative gin config
  metrics: str  # metrics.jsonl
  tensorboard: str  # event files
  loss_plot: str  # loss.png
  checkpoints: str  # Orbax step directories

  @classmethod
  def under(cls, run_dir: str) -> "RunPaths":
    root = storage.resolve(run_dir)
    join = lambda name: storage.join(root, name)
    return cls(root, join("config.gin"), join("metrics.jsonl"), join("tensorboard"),
               join("loss.png"), join("checkpoints"))


def load_run_experiment(run_dir: str, gin_params: tuple[str, ...] = ()) -> Experiment:
  """The Experiment a run directory was trained with (its config.gin), with optional overrides."""
  paths = RunPaths.under(run_dir)
  storage.check_bucket(paths.root, "read")
  if not storage.exists(paths.config):
    raise FileNotFoundError(
        f"{paths.config} does not exist: {run_dir} is not a pretrainx run directory "
        "(train first, or pass --gin_file to describe the model).")
  return parse_gin([paths.config], gin_params)
