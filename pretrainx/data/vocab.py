"""Vocabularies: text <-> int ids. The default is byte-level and needs no training.

`ByteVocabulary` matches `seqio.ByteVocabulary` id for id (0 pad, 1 eos, 2 unk, byte b -> b + 3), so
stores and models are interchangeable with SeqIO pipelines; other vocabularies plug in through gin.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteVocabulary:
  """UTF-8 bytes shifted by the three special ids."""

  pad_id: int = 0
  eos_id: int = 1
  unk_id: int = 2
  num_special: int = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special

  @property
  def name(self) -> str:
    return "byte"

  def encode(self, text: str) -> np.ndarray:
    """-> int32 ids [len(utf8 bytes)]; no eos is appended."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.num_special

  def decode(self, ids) -> str:
    """Stops at the first eos; drops pad and other special ids; invalid UTF-8 is replaced."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[: eos[0]]
    ids = ids[(ids >= self.num_special) & (ids < self.vocab_size)]
    return (ids - self.num_special).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
