"""Vocabularies: text <-> int ids. The default is byte-level and needs no training.

`ByteVocabulary` matches `seqio.ByteVocabulary` id for id (0 pad, 1 eos, 2 unk, byte b -> b + 3,
then `extra_ids` at the end), so stores and models are interchangeable with SeqIO pipelines; other
vocabularies plug in through gin. Extra ids carry named special tokens (UL2 mode tokens, control
tokens), counted up from the first extra id, and UL2 sentinels, counted down from the last id as in
T5 (sentinel k = vocab_size - 1 - k).
"""

from __future__ import annotations

import dataclasses

import numpy as np


SPECIAL_TOKENS = ("<|R|>", "<|S|>", "<|X|>", "<|good|>", "<|bad|>")


@dataclasses.dataclass(frozen=True)
class ByteVocabulary:
  """UTF-8 bytes shifted by the three special ids, then `extra_ids` ids for special tokens."""

  pad_id: int = 0
  eos_id: int = 1
  unk_id: int = 2
  num_special: int = 3
  extra_ids: int = 0

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special + self.extra_ids

  @property
  def name(self) -> str:
    return "byte" if not self.extra_ids else f"byte+extra{self.extra_ids}"

  def encode(self, text: str) -> np.ndarray:
    """-> int32 ids [len(utf8 bytes)]; no eos is appended."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.num_special

  def decode(self, ids) -> str:
    """Stops at the first eos; drops pad and other special ids; invalid UTF-8 is replaced."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[: eos[0]]
    ids = ids[(ids >= self.num_special) & (ids < self.num_special + 256)]
    return (ids - self.num_special).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _extra_base(vocab) -> int:
  return vocab.vocab_size - getattr(vocab, "extra_ids", 0)


def special_id(vocab, name: str) -> int:
  """The id of a named special token (one of SPECIAL_TOKENS), taken from the first extra ids."""
  if name not in SPECIAL_TOKENS:
    raise ValueError(f"unknown special token {name!r}; choose one of {SPECIAL_TOKENS}.")
  index = SPECIAL_TOKENS.index(name)
  if index >= getattr(vocab, "extra_ids", 0):
    raise ValueError(
        f"special token {name} needs at least {index + 1} extra ids but vocabulary "
        f"{vocab.name} has {getattr(vocab, 'extra_ids', 0)}; set ByteVocabulary.extra_ids "
        "(e.g. 128) and ModelConfig.vocab_size to the new vocab_size.")
  return _extra_base(vocab) + index


def num_sentinels(vocab) -> int:
  """Sentinels available: the extra ids not taken by named special tokens."""
  return max(getattr(vocab, "extra_ids", 0) - len(SPECIAL_TOKENS), 0)


def sentinel_id(vocab, k: int) -> int:
  """UL2/T5 sentinel k, counted down from the last id."""
  if not 0 <= k < num_sentinels(vocab):
    raise ValueError(
        f"sentinel {k} needs at least {len(SPECIAL_TOKENS) + k + 1} extra ids but vocabulary "
        f"{vocab.name} has {getattr(vocab, 'extra_ids', 0)}; set ByteVocabulary.extra_ids "
        "(e.g. 128) and ModelConfig.vocab_size to the new vocab_size.")
  return vocab.vocab_size - 1 - k
