"""Gin text in and out: gin files, text and `--gin_param` bindings into Experiment sections, and
any Experiment back as gin text (the operative config saved with every run).

Includes are expanded here, through pretrainx.storage, so gin files may live in buckets, and
bindings renamed by a section split (experiment.RENAMED) are rewritten to their new names.
gin itself is imported only in this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any

from absl import logging

from pretrainx import storage
from pretrainx.config.cpt import LinearizeConfig, LoraConfig
from pretrainx.config.data import (CorpusTask, Denoiser, FileTask, MixtureSpec, ObjectiveConfig,
                                   Selection, Stage)
from pretrainx.config.experiment import GROUPS, RENAMED, SECTION_CLASSES, Experiment
from pretrainx.config.run import LongContextEvalConfig
from pretrainx.vocab import ByteVocabulary, HFTokenizerVocabulary

# Gin files include others by repo-relative path ('gin_configs/models/tiny.gin').
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_GROUP_CLASSES = tuple(cls for groups in GROUPS.values() for _, cls in groups)
CONFIGURABLES = (tuple(SECTION_CLASSES.values()) + _GROUP_CLASSES + (
    LoraConfig, ByteVocabulary, HFTokenizerVocabulary, Stage, Selection, ObjectiveConfig, Denoiser,
    FileTask, CorpusTask, MixtureSpec, LinearizeConfig, LongContextEvalConfig))

_GIN_CLASSES: dict[str, Any] = {}  # name -> gin-wrapped class (calling it applies the bindings)
_GIN_READERS: list[bool] = []
_WARNED: set[str] = set()


def _gin():
  import gin  # pylint: disable=import-outside-toplevel

  for cls in CONFIGURABLES:
    if cls.__name__ not in _GIN_CLASSES:
      _GIN_CLASSES[cls.__name__] = gin.external_configurable(cls, name=cls.__name__,
                                                             module="pretrainx")
  return gin


def register_gin_readers() -> None:
  """Lets gin itself read files (and includes) from buckets, for callers that hand it paths."""
  gin = _gin()
  if not _GIN_READERS:
    gin.config.register_file_reader(lambda path: storage.open_file(path, "r"),
                                    lambda path: storage.is_remote(path) and storage.isfile(path))
    _GIN_READERS.append(True)


# ---------------------------------------------------------------------------------- reading

_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1\s*(#.*)?$""")
_BINDING = re.compile(r"^(\s*(?:[\w.]+/)*)(\w+\.\w+)(\s*=)", re.MULTILINE)


def rename_legacy_bindings(text: str) -> str:
  """`text` with every binding renamed by a section split written under its new name."""
  renamed: list[str] = []

  def new_name(m: re.Match) -> str:
    if m.group(2) not in RENAMED:
      return m.group(0)
    renamed.append(m.group(2))
    return f"{m.group(1)}{RENAMED[m.group(2)]}{m.group(3)}"

  text = _BINDING.sub(new_name, text)
  fresh = sorted(set(renamed) - _WARNED)
  if fresh:
    _WARNED.update(fresh)
    logging.warning("gin bindings from before the section split still read; their new names: %s.",
                    ", ".join(f"{old} -> {RENAMED[old]}" for old in fresh))
  return text


def _find(path: str, search_paths: tuple[str, ...], included_from: str | None) -> str:
  if storage.is_remote(path):
    if storage.isfile(path):
      return path
  else:
    for base in ("",) if os.path.isabs(path) else search_paths:
      candidate = os.path.join(base, path)
      if os.path.isfile(candidate):
        return candidate
  where = f" (included from {included_from})" if included_from else ""
  raise FileNotFoundError(f"gin file {path}{where} not found (looked relative to "
                          f"{', '.join(search_paths)}).")


def read_gin_file(path: str, search_paths: tuple[str, ...] = ()) -> str:
  """The text of a gin file with its includes expanded in place (local or bucket paths, found
  relative to the working directory, the repository and `search_paths`)."""
  return _expand(path, tuple(dict.fromkeys((os.getcwd(), REPO_ROOT, *search_paths))), None, ())


def _expand(path: str, search_paths: tuple[str, ...], included_from: str | None,
            stack: tuple[str, ...]) -> str:
  found = _find(path, search_paths, included_from)
  if found in stack:
    raise ValueError(f"gin file {found} includes itself (through {' -> '.join(stack)}).")
  lines = []
  for line in storage.read_text(found).splitlines():
    m = _INCLUDE.match(line)
    lines.append(_expand(m.group(2), search_paths, found, (*stack, found)) if m else line)
  return "\n".join(lines)


def _known_bindings() -> list[str]:
  return [f"{cls.__name__}.{f.name}" for cls in CONFIGURABLES for f in dataclasses.fields(cls)]


def _explain_gin_error(err: Exception) -> str:
  text = str(err)
  m = re.search(r"In call to configurable '(\w+)'", text)
  if m and isinstance(err, ValueError):  # a section refused its values: its message says why
    return f"{text.splitlines()[0]} (gin bindings of {m.group(1)})"
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


def _build(cls: type) -> Any:
  """`cls` from the current bindings, its settings groups from their own classes' bindings."""
  groups = {field: _GIN_CLASSES[group.__name__]() for field, group in GROUPS.get(cls, ())}
  return _GIN_CLASSES[cls.__name__](**groups)


_MODEL_BINDING = re.compile(r"^\s*ModelConfig\.(\w+)\s*=", re.MULTILINE)


def parse_gin_bindings(texts: list[str], gin_params: list[str] | tuple[str, ...] = (),
                       extra: tuple[type, ...] = ()
                       ) -> tuple[Experiment, dict[str, Any], set[str]]:
  """Gin texts (includes already expanded) then bindings -> (Experiment, {class name: object}
  for the configurables `extra` built from the same bindings, the ModelConfig fields bound).

  Nothing is validated across sections and InitConfig.source is not consulted: that is
  pretrainx.config.load's job."""
  gin = _gin()
  texts = [rename_legacy_bindings(t) for t in [*texts, "\n".join(gin_params)]]
  gin.clear_config()
  try:
    for text in texts:
      gin.parse_config(text)
    gin.finalize()  # refuses macros left at %gin.REQUIRED
    exp = Experiment(**{name: _build(cls) for name, cls in SECTION_CLASSES.items()})
    extras = {cls.__name__: _build(cls) for cls in extra}
  except (ValueError, TypeError, SyntaxError) as err:
    raise ValueError(_explain_gin_error(err)) from err
  finally:
    gin.clear_config()
  return exp, extras, {m.group(1) for t in texts for m in _MODEL_BINDING.finditer(t)}


# ---------------------------------------------------------------------------------- writing


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


def _bindings(obj: Any, scope: str) -> list[str]:
  """Every field of `obj` as a binding on its class; settings groups bound on their own."""
  groups = dict(GROUPS.get(type(obj), ()))
  nested: list[str] = []
  top, grouped = [], []
  for f in dataclasses.fields(obj):
    if f.name in groups:
      grouped += _bindings(getattr(obj, f.name), f"{scope}_{f.name}")
      continue
    expr = _gin_expr(getattr(obj, f.name), f"{scope}_{f.name}", nested)
    top.append(f"{type(obj).__name__}.{f.name} = {expr}")
  return top + nested + grouped


def experiment_to_gin(exp: Experiment) -> str:
  """Every field of every section as a gin binding; parse_gin_text of the text gives `exp` back.

  Nested configurables (the vocabulary, mixture stages, tasks, objectives) get a gin scope each.
  """
  lines = ["# Operative configuration written by pretrainx; load with --gin_file."]
  for section in dataclasses.fields(exp):
    lines += [f"\n# {section.name}", *_bindings(getattr(exp, section.name), section.name)]
  return "\n".join(lines) + "\n"
