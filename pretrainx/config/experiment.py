"""The Experiment: every section of a run's configuration in one frozen bundle.

Notebooks build it directly (`Experiment().replace(run={'steps': 10})`); gin_io fills it from gin
files. Making one applies the precision policy, so every copy of a config holds the dtypes used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging

from pretrainx.config.cpt import InitConfig, TuneConfig
from pretrainx.config.data import DataConfig, ReweightConfig, check_stages
from pretrainx.config.distill import DistillConfig
from pretrainx.config.mesh import MeshConfig
from pretrainx.config.phases import Phase, phase_index, run_phases
from pretrainx.config.model import ModelConfig, MoeConfig
from pretrainx.config.optim import (AdafactorConfig, MuonConfig, OptimizerConfig, ScheduleConfig,
                                    SophiaConfig)
from pretrainx.config.run import (AccumulationConfig, CheckpointConfig, EmaConfig, GuardConfig,
                                  HarnessConfig, LossConfig, PrecisionConfig, RunConfig,
                                  SampleConfig)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run's configuration; each field is a section that says one thing."""

  model: ModelConfig = ModelConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  mesh: MeshConfig = MeshConfig()
  data: DataConfig = DataConfig()
  run: RunConfig = RunConfig()
  loss: LossConfig = LossConfig()
  accumulation: AccumulationConfig = AccumulationConfig()
  sample: SampleConfig = SampleConfig()
  precision: PrecisionConfig = PrecisionConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  guard: GuardConfig = GuardConfig()
  init: InitConfig = InitConfig()
  ema: EmaConfig = EmaConfig()
  tune: TuneConfig = TuneConfig()
  harness: HarnessConfig = HarnessConfig()
  distill: DistillConfig = DistillConfig()

  def __post_init__(self):
    dtypes = self.precision.dtypes
    if dtypes is None:
      return
    wanted = {("model", "param_dtype"): dtypes[0], ("model", "dtype"): dtypes[1],
              ("optimizer", "state_dtype"): dtypes[2]}
    clashes = [f"{type(getattr(self, s)).__name__}.{f}={getattr(getattr(self, s), f)!r}"
               for (s, f), v in wanted.items()
               if getattr(getattr(self, s), f) not in (v, _default(s, f))]
    if clashes:
      raise ValueError(f"PrecisionConfig.policy={self.precision.policy!r} sets the dtypes, but "
                       f"{', '.join(clashes)} is bound too; unset one of them.")
    for section in ("model", "optimizer"):
      fields = {f: v for (s, f), v in wanted.items() if s == section}
      object.__setattr__(self, section, dataclasses.replace(getattr(self, section), **fields))

  def replace(self, **sections: dict[str, Any]) -> "Experiment":
    """exp.replace(run={'steps': 10}) -> a copy with those fields of those sections changed.

    Field names from before a section split (run={'z_loss': ...}) go to their new section; a
    settings group may be given as a dict of its fields (model={'moe': {'num_experts': 4}})."""
    changes: dict[tuple[str, ...], dict[str, Any]] = {}
    for name, fields in sections.items():
      for key, value in fields.items():
        where, field = _route(name, type(getattr(self, name)), key)
        changes.setdefault(where, {})[field] = value
    new = {name: dict(fields) for (name, *group), fields in changes.items() if not group}
    for name, fields in new.items():  # a group given as a dict: model={'moe': {'top_k': 1}}
      for group, _ in GROUPS.get(type(getattr(self, name)), ()):
        if isinstance(fields.get(group), dict):
          fields[group] = dataclasses.replace(getattr(getattr(self, name), group), **fields[group])
    for (name, *group), fields in changes.items():
      if group:
        current = new.get(name, {}).get(group[0], getattr(getattr(self, name), group[0]))
        new.setdefault(name, {})[group[0]] = dataclasses.replace(current, **fields)
    return dataclasses.replace(self, **{
        name: dataclasses.replace(getattr(self, name), **fields) for name, fields in new.items()})


def _default(section: str, field: str) -> Any:
  return getattr(SECTION_CLASSES[section](), field)


SECTION_CLASSES = {f.name: type(f.default) for f in dataclasses.fields(Experiment)}
# Settings groups nested in a section; in gin they are bound on their own class.
GROUPS: dict[type, tuple[tuple[str, type], ...]] = {
    ModelConfig: (("moe", MoeConfig),),
    DataConfig: (("reweight", ReweightConfig),),
    OptimizerConfig: (("muon", MuonConfig), ("sophia", SophiaConfig),
                      ("adafactor", AdafactorConfig)),
}
# class -> where its object lives in an Experiment: (section,) or (section, group).
LOCATIONS: dict[type, tuple[str, ...]] = {cls: (name,) for name, cls in SECTION_CLASSES.items()}
for _section_cls, _groups in GROUPS.items():
  _section = LOCATIONS[_section_cls][0]
  for _field, _cls in _groups:
    LOCATIONS[_cls] = (_section, _field)

# Bindings renamed when RunConfig and OptimizerConfig were split into sections: old gin files,
# run directories and checkpoints written before still read (gin_io rewrites the names).
RENAMED = {
    "RunConfig.z_loss": "LossConfig.z_loss",
    "RunConfig.microbatches": "AccumulationConfig.microbatches",
    "RunConfig.sample_prompt": "SampleConfig.prompt",
    "RunConfig.sample_tokens": "SampleConfig.tokens",
    "RunConfig.sample_temperature": "SampleConfig.temperature",
    "RunConfig.sample_top_k": "SampleConfig.top_k",
    "RunConfig.precision": "PrecisionConfig.policy",
    "OptimizerConfig.schedule": "ScheduleConfig.name",
    **{f"OptimizerConfig.{f}": f"ScheduleConfig.{f}" for f in (
        "warmup_steps", "end_lr_ratio", "decay_fraction", "decay_shape", "rewarm_start_lr_ratio",
        "rewarm_decay", "rewarm_start_step", "cooldown_steps", "infinite_constant_ratio")},
    "OptimizerConfig.muon_exclude": "MuonConfig.exclude",
    "OptimizerConfig.muon_fallback": "MuonConfig.fallback",
    "OptimizerConfig.muon_consistent_rms": "MuonConfig.consistent_rms",
    "OptimizerConfig.sophia_gamma": "SophiaConfig.gamma",
    "OptimizerConfig.sophia_interval": "SophiaConfig.interval",
    "OptimizerConfig.adafactor_min_dim": "AdafactorConfig.min_dim",
}
_BY_NAME = {cls.__name__: cls for cls in LOCATIONS}


def _route(section: str, cls: type, field: str) -> tuple[tuple[str, ...], str]:
  """(location, field) a replace() key names: its own section's, or where a renamed one went."""
  if field in {f.name for f in dataclasses.fields(cls)}:
    return (section,), field
  renamed = RENAMED.get(f"{cls.__name__}.{field}")
  if renamed is None:
    return (section,), field  # dataclasses.replace names the unknown field
  new_cls, new_field = renamed.split(".")
  return LOCATIONS[_BY_NAME[new_cls]], new_field


# Sections whose change makes an existing run directory a different experiment.
IDENTITY_SECTIONS = ("model", "data")


def validate(exp: Experiment) -> None:
  """Cross-section checks that no single dataclass can make on its own."""
  run, model = exp.run, exp.model
  if run.seq_len > model.max_seq_len:
    raise ValueError(
        f"RunConfig.seq_len={run.seq_len} exceeds ModelConfig.max_seq_len={model.max_seq_len}; "
        "lower seq_len or raise max_seq_len.")
  run_phases(run, exp.data.schedule_stages, model)  # each stage's length, batch and rope
  vocab_size = exp.data.vocabulary.vocab_size
  if vocab_size > model.vocab_size:
    raise ValueError(
        f"the vocabulary has {vocab_size} ids but ModelConfig.vocab_size={model.vocab_size}; "
        f"set ModelConfig.vocab_size >= {vocab_size}.")
  if run.steps < 1 or run.global_batch_size < 1 or exp.accumulation.microbatches < 1:
    raise ValueError("RunConfig.steps, RunConfig.global_batch_size and "
                     "AccumulationConfig.microbatches must be positive.")
  check_stages(exp.data.schedule_stages, exp.data.domains)
  _check_reweighting(exp)
  _check_experts(exp)
  _check_distill(exp)
  causal_only = sorted({i for i in model.layer_impls if i in ("linear", "hybrid")})
  if exp.data.uses_prefix_lm and causal_only:
    raise ValueError(
        f"a 'ul2' stage needs a bidirectional prefix, which attention_impl "
        f"{', '.join(map(repr, causal_only))} cannot give; use 'reference' or 'flash'.")


def check_trainable(exp: Experiment) -> None:
  """Checks only a run that trains must pass (on top of validate, which eval and generate use
  too): 'dynamic' RoPE scaling, whose frequencies change with each batch's length, is for
  inference only."""
  for phase in phases(exp):
    if phase.model(exp.model).rope_scaling == "dynamic":
      where = (f"the stage at step {phase.start_step}: " if dict(phase.rope).get(
          "rope_scaling") == "dynamic" else "ModelConfig.")
      raise ValueError(f"{where}rope_scaling='dynamic' is for inference only (its frequencies "
                       "change with each batch's length); train with 'yarn', 'ntk' or "
                       "'linear'.")


def _check_reweighting(exp: Experiment) -> None:
  rw, log_every, domains = exp.data.reweight, exp.run.log_every, exp.data.domains
  unknown = sorted(set(rw.reference_losses) - set(domains))
  if unknown:
    raise ValueError(f"ReweightConfig.reference_losses names unknown domain(s) {unknown}; the "
                     f"data has {list(domains)}.")
  if not rw.enabled:
    return
  if rw.every_steps % log_every:
    raise ValueError(f"ReweightConfig.every_steps={rw.every_steps} is not a multiple of "
                     f"RunConfig.log_every={log_every} (the losses are read at log points); use "
                     f"a multiple such as {max(rw.every_steps // log_every, 1) * log_every}.")
  if rw.method == "loss_slope" and rw.every_steps < 2 * log_every:
    raise ValueError(f"ReweightConfig.method='loss_slope' fits a slope to the window's log "
                     f"points, so every_steps={rw.every_steps} needs to be at least "
                     f"2 * RunConfig.log_every = {2 * log_every}.")
  if rw.start_step < 0:
    raise ValueError(f"ReweightConfig.start_step={rw.start_step} is negative.")
  missing = [d for d in domains if d not in rw.reference_losses]
  if rw.method == "excess_loss" and missing:
    raise ValueError(
        f"ReweightConfig.method='excess_loss' needs ReweightConfig.reference_losses for every "
        f"domain (missing {missing}): without a reference the excess is the raw loss, and the "
        "weight drifts to the noisiest domain. Bind each domain's validation loss under a "
        "reference model (`pretrainx eval --run_dir=REFERENCE` prints them), or use "
        "method='loss_slope'.")


def _check_experts(exp: Experiment) -> None:
  moe, expert, frozen = exp.model.moe, exp.mesh.expert, exp.tune.frozen_experts
  if moe.enabled and expert > 1 and moe.num_experts % expert:
    raise ValueError(
        f"MoeConfig.num_experts={moe.num_experts} is not divisible by MeshConfig.expert={expert} "
        f"(each device of the expert axis holds num_experts / expert of them); use a multiple of "
        f"{expert} experts or set MeshConfig.expert to a divisor of {moe.num_experts}.")
  if moe.enabled and moe.top_k == 1 and moe.norm_topk and not exp.init.source:
    logging.warning("MoeConfig.top_k=1 with norm_topk=True: every routing weight is 1, so the "
                    "router learns from the balance and z losses only; set norm_topk=False "
                    "(Switch Transformer style) to weight each expert by its probability.")
  if frozen and not (moe.enabled and frozen < moe.num_experts):
    raise ValueError(
        f"TuneConfig.frozen_experts={frozen} needs an MoE model with more experts than that "
        f"(MoeConfig.num_experts={moe.num_experts}); it freezes the first experts of each layer "
        "(Lifelong-MoE: the source's experts) while the added ones train.")


def _check_distill(exp: Experiment) -> None:
  distill, steps = exp.distill, exp.run.steps
  if distill.alpha_schedule != "constant" and distill.alpha_end_step > steps:
    raise ValueError(f"DistillConfig.alpha_end_step={distill.alpha_end_step} is past the run's "
                     f"last step (RunConfig.steps={steps}); use a step <= {steps} (0: the end).")


def phases(exp: Experiment) -> tuple[Phase, ...]:
  """The run's phases (config.phases): each stage's seq_len, batch size and rope settings."""
  return run_phases(exp.run, exp.data.schedule_stages)


def phase_experiment(exp: Experiment, step: int) -> Experiment:
  """`exp` as the batch of `step` sees it: RunConfig.seq_len / global_batch_size and the model's
  rope_* fields of that step's stage. A view for evaluating, sampling and exporting at `step`;
  the run itself is always configured (and saved) by `exp`."""
  all_phases = phases(exp)
  return experiment_of(exp, all_phases[phase_index(all_phases, step)])


def experiment_of(exp: Experiment, phase: Phase) -> Experiment:
  """`exp` with `phase`'s seq_len, batch size and rope settings (one of phases(exp)); `exp`
  itself when the phase changes none of them."""
  if (phase.seq_len, phase.global_batch_size, phase.rope) == (
      exp.run.seq_len, exp.run.global_batch_size, ()):
    return exp
  return dataclasses.replace(
      exp, model=phase.model(exp.model),
      run=dataclasses.replace(exp.run, seq_len=phase.seq_len,
                              global_batch_size=phase.global_batch_size))


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
