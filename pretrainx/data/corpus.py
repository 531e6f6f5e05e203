"""The embedded default corpus, built offline from text that ships with Python itself.

Two domains: 'prose', the interpreter's documentation topics (`pydoc_data.topics`, ~0.46 MB of
English), and 'code', the standard library's top-level `.py` modules (~4.6 MB on CPython 3.12).
Each document goes wholly to train or validation, by a hash of its name (deterministic everywhere).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sysconfig
from pretrainx.config.data import DOMAINS

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # stable identifier, e.g. 'prose/assert' or 'code/argparse.py'
  domain: str
  text: str


def _prose_documents() -> list[Document]:
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  return [Document(f"prose/{key}", "prose", text) for key, text in sorted(topics.topics.items())]


def _code_documents() -> list[Document]:
  stdlib = sysconfig.get_paths()["stdlib"]
  docs = []
  for fname in sorted(os.listdir(stdlib)):
    path = os.path.join(stdlib, fname)
    if fname.endswith(".py") and os.path.isfile(path):
      with open(path, encoding="utf-8", errors="replace") as f:
        docs.append(Document(f"code/{fname}", "code", f.read()))
  return docs


def _hash(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=None)
def _split_domain(domain: str, validation_fraction: float) -> dict[str, tuple[Document, ...]]:
  """Documents in hash order go to validation until it holds `validation_fraction` of the bytes."""
  docs = {"prose": _prose_documents, "code": _code_documents}[domain]()
  total = sum(len(d.text) for d in docs)
  validation, held = [], 0
  for doc in sorted(docs, key=lambda d: _hash(d.name)):
    if held >= validation_fraction * total:
      break
    validation.append(doc)
    held += len(doc.text)
  names = {d.name for d in validation}
  train = tuple(d for d in docs if d.name not in names)
  return {"train": train, "validation": tuple(sorted(validation, key=lambda d: d.name))}


def load_documents(split: str, domains: tuple[str, ...] = DOMAINS,
                   validation_fraction: float = 0.05) -> list[Document]:
  """All documents of `split` for the given domains, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}.")
  unknown = [d for d in domains if d not in DOMAINS]
  if unknown:
    raise ValueError(f"unknown corpus domain(s) {unknown}; the embedded corpus has {DOMAINS}.")
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must lie strictly between 0 and 1.")
  return [doc for d in domains for doc in _split_domain(d, validation_fraction)[split]]


def corpus_stats(validation_fraction: float = 0.05) -> dict[str, dict[str, dict[str, int]]]:
  """{domain: {split: {'documents', 'bytes'}}}, for README and `data inspect`."""
  out: dict = {}
  for domain in DOMAINS:
    parts = _split_domain(domain, validation_fraction)
    out[domain] = {s: {"documents": len(parts[s]),
                       "bytes": sum(len(d.text.encode()) for d in parts[s])} for s in SPLITS}
  return out
