"""Configuration, the bottom layer: every section of a run as a frozen dataclass, the Experiment
that bundles them, gin text in and out, the run directory layout, and the architecture a run's source fixes.

It imports nothing of pretrainx but storage and vocab; everything that builds from a config
(models, optimizers, data pipelines, runtimes) imports it. The sections live in submodules by
topic: model, optim, data, mesh, run, cpt, distill.
"""

from pretrainx.config.cpt import InitConfig, LinearizeConfig, LoraConfig, TuneConfig
from pretrainx.config.data import (CorpusTask, DataConfig, Denoiser, FileTask, MixtureSpec,
                                   ObjectiveConfig, ReweightConfig, Selection, Stage)
from pretrainx.config.distill import DistillConfig
from pretrainx.config.experiment import (IDENTITY_SECTIONS, RENAMED, Experiment,
                                         check_trainable, config_differences, experiment_of,
                                         phase_experiment, phases, validate)
from pretrainx.config.phases import Phase, phase_index
from pretrainx.config.gin_io import (CONFIGURABLES, experiment_to_gin, read_gin_file,
                                     register_gin_readers, rename_legacy_bindings)
from pretrainx.config.hf_config import load_hf_config
from pretrainx.config.load import parse_gin, parse_gin_text, parse_gin_with
from pretrainx.config.mesh import MeshConfig
from pretrainx.config.model import ModelConfig, MoeConfig
from pretrainx.config.optim import (AdafactorConfig, MuonConfig, OptimizerConfig, ScheduleConfig,
                                    SophiaConfig)
from pretrainx.config.paths import RunPaths, load_run_experiment
from pretrainx.config.sources import source_experiment, source_kind, with_source_architecture
from pretrainx.config.run import (AccumulationConfig, CheckpointConfig, EmaConfig, GuardConfig,
                                  HarnessConfig, LongContextEvalConfig, LossConfig,
                                  PrecisionConfig, RunConfig, SampleConfig)

__all__ = [
    "AccumulationConfig",
    "AdafactorConfig",
    "CONFIGURABLES",
    "CheckpointConfig",
    "CorpusTask",
    "DataConfig",
    "Denoiser",
    "DistillConfig",
    "EmaConfig",
    "Experiment",
    "FileTask",
    "GuardConfig",
    "HarnessConfig",
    "IDENTITY_SECTIONS",
    "InitConfig",
    "LinearizeConfig",
    "LongContextEvalConfig",
    "LoraConfig",
    "LossConfig",
    "MeshConfig",
    "MixtureSpec",
    "ModelConfig",
    "MoeConfig",
    "MuonConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "Phase",
    "PrecisionConfig",
    "RENAMED",
    "RunConfig",
    "RunPaths",
    "SampleConfig",
    "ScheduleConfig",
    "SophiaConfig",
    "ReweightConfig",
    "Selection",
    "Stage",
    "TuneConfig",
    "check_trainable",
    "config_differences",
    "experiment_of",
    "experiment_to_gin",
    "load_hf_config",
    "load_run_experiment",
    "parse_gin",
    "phase_experiment",
    "phase_index",
    "phases",
    "parse_gin_text",
    "parse_gin_with",
    "read_gin_file",
    "register_gin_readers",
    "rename_legacy_bindings",
    "source_experiment",
    "source_kind",
    "validate",
    "with_source_architecture",
]
