"""The Experiment of gin files or gin text: parsed (gin_io), its architecture taken from
InitConfig.source where the source fixes it (sources), then validated across sections."""

from __future__ import annotations

from typing import Any

from pretrainx.config.experiment import Experiment, validate
from pretrainx.config.gin_io import parse_gin_bindings, read_gin_file
from pretrainx.config.sources import with_source_architecture


def parse_gin_with(gin_files: list[str] | tuple[str, ...], gin_params: list[str] | tuple[str, ...],
                   extra: tuple[type, ...] = (), search_paths: tuple[str, ...] = (),
                   texts: tuple[str, ...] = ()) -> tuple[Experiment, dict[str, Any]]:
  """parse_gin, plus the configurables `extra` (e.g. LinearizeConfig) built from the same
  bindings: (experiment, {class name: object}). `texts` are gin texts read after the files."""
  texts = [read_gin_file(f, tuple(search_paths)) for f in gin_files] + list(texts)
  exp, extras, bound = parse_gin_bindings(texts, gin_params, extra)
  exp = with_source_architecture(exp, bound)
  validate(exp)
  return exp, extras


def parse_gin(gin_files: list[str] | tuple[str, ...] = (), gin_params: list[str] | tuple[str, ...] = (),
              search_paths: tuple[str, ...] = ()) -> Experiment:
  """Reads gin files then `--gin_param` overrides into a validated Experiment."""
  return parse_gin_with(gin_files, gin_params, (), search_paths)[0]


def parse_gin_text(text: str, gin_params: list[str] | tuple[str, ...] = ()) -> Experiment:
  """Gin text (a run's config.gin, a checkpoint's config_gin) into a validated Experiment,
  without writing it anywhere."""
  return parse_gin_with((), gin_params, texts=(text,))[0]
