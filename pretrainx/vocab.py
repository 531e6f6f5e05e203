"""Vocabularies: text <-> int ids. The default is byte-level and needs no training.

`ByteVocabulary` matches `seqio.ByteVocabulary` id for id (0 pad, 1 eos, 2 unk, byte b -> b + 3,
then `extra_ids` at the end), so stores and models are interchangeable with SeqIO pipelines; other
vocabularies plug in through gin. Extra ids carry named special tokens (UL2 mode tokens, control
tokens), counted up from the first extra id, and UL2 sentinels, counted down from the last id as in
T5 (sentinel k = vocab_size - 1 - k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from pretrainx import storage


# Named special tokens, in order, on the first extra ids: with ByteVocabulary(extra_ids=E),
# SPECIAL_TOKENS[i] is id 259 + i. '<|R|>', '<|S|>', '<|X|>' are UL2's mode tokens (regular,
# sequential, extreme denoising); '<|good|>' and '<|bad|>' are control tokens chosen from a
# document's quality score. The other E - len(SPECIAL_TOKENS) extra ids are UL2 sentinels, counted
# down from the top: sentinel k is vocab_size - 1 - k (T5/SeqIO's convention). Append new names
# at the end only: the ids of existing names must not move.
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

  def decode(self, ids, show_special: bool = False) -> str:
    """Stops at the first eos; drops pad, unk and out-of-range ids; invalid UTF-8 is replaced.

    Extra ids are dropped too, or with `show_special` written as their names: '<|good|>' etc. for
    SPECIAL_TOKENS and '<extra_id_k>' for sentinel k.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[: eos[0]]
    is_extra = (ids >= 256 + self.num_special) & (ids < self.vocab_size)
    if not show_special or not is_extra.any():
      return self._decode_bytes(ids)
    # Alternate runs of bytes and extra ids: [bytes][extra][bytes]...
    cuts = np.flatnonzero(is_extra)
    parts, start = [], 0
    for cut in cuts.tolist():
      parts += [self._decode_bytes(ids[start:cut]), extra_id_name(self, int(ids[cut]))]
      start = cut + 1
    return "".join(parts) + self._decode_bytes(ids[start:])

  def _decode_bytes(self, ids: np.ndarray) -> str:
    ids = ids[(ids >= self.num_special) & (ids < self.num_special + 256)]
    return (ids - self.num_special).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_FIX_EXTRA_IDS = ("set ByteVocabulary.extra_ids (e.g. 128) and ModelConfig.vocab_size to the new "
                  "vocab_size (259 + extra_ids); other vocabularies have no extra ids.")


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
        f"{vocab.name} has {getattr(vocab, 'extra_ids', 0)}; {_FIX_EXTRA_IDS}")
  return _extra_base(vocab) + index


def num_sentinels(vocab) -> int:
  """Sentinels available: the extra ids not taken by named special tokens."""
  return max(getattr(vocab, "extra_ids", 0) - len(SPECIAL_TOKENS), 0)


def sentinel_id(vocab, k: int) -> int:
  """UL2/T5 sentinel k, counted down from the last id."""
  if k < 0:
    raise ValueError(f"sentinel index {k} is negative; sentinels are numbered 0, 1, ...")
  if k >= num_sentinels(vocab):
    raise ValueError(
        f"sentinel {k} needs at least {len(SPECIAL_TOKENS) + k + 1} extra ids but vocabulary "
        f"{vocab.name} has {getattr(vocab, 'extra_ids', 0)}; {_FIX_EXTRA_IDS}")
  return vocab.vocab_size - 1 - k


def extra_id_name(vocab, token_id: int) -> str:
  """The name of an extra id: a SPECIAL_TOKENS name, or '<extra_id_k>' for sentinel k."""
  index = int(token_id) - _extra_base(vocab)
  if not 0 <= index < getattr(vocab, "extra_ids", 0):
    raise ValueError(f"id {token_id} is not an extra id of vocabulary {vocab.name} (extra ids are "
                     f"{_extra_base(vocab)}..{vocab.vocab_size - 1}).")
  if index < len(SPECIAL_TOKENS):
    return SPECIAL_TOKENS[index]
  return f"<extra_id_{vocab.vocab_size - 1 - int(token_id)}>"


# ----------------------------------------------------------------------------- Hugging Face


_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


_TOKENIZERS: dict[tuple[str, str], tuple] = {}  # (file, version) -> _load_tokenizer's result


def _tokenizer_file(path: str) -> str:
  file = storage.join(path, "tokenizer.json") if storage.isdir(path) else path
  if not storage.isfile(file):
    raise FileNotFoundError(f"no Hugging Face tokenizer at {file}; pass a tokenizer.json (local "
                            "or in a bucket) or the model directory holding it. Nothing is "
                            "downloaded from a hub.")
  return storage.resolve(file)


def _load_tokenizer(path: str) -> tuple:
  """(tokenizers.Tokenizer, sha256 of the file, tokenizer_config.json next to it or {}), cached
  per file and version (local modification time; in a bucket, per process)."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  file = _tokenizer_file(path)
  key = (file, "" if storage.is_remote(file) else str(os.stat(file).st_mtime_ns))
  if key not in _TOKENIZERS:
    raw = storage.read_bytes(file)
    extra_file = storage.join(storage.parent(file), "tokenizer_config.json")
    extra = json.loads(storage.read_text(extra_file)) if storage.isfile(extra_file) else {}
    _TOKENIZERS[key] = (Tokenizer.from_str(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest(),
                        extra)
  return _TOKENIZERS[key]


@dataclasses.dataclass(frozen=True)
class HFTokenizerVocabulary:
  """A Hugging Face `tokenizer.json` (local file, `tokenizers` library), loaded on first use.

  Attributes:
    path: the tokenizer.json, or a directory holding it.
    eos_token / pad_token: special-token strings; None takes them from a tokenizer_config.json
      next to the file, else the first common name the vocabulary has ('</s>', '<|endoftext|>',
      ...). With no pad token the pad id is the eos id (the loss mask hides padding anyway).
  encode() adds no special tokens (no BOS/EOS), like ByteVocabulary; `name` carries a hash of the
  file so that token stores record which tokenizer made them.
  """

  path: str
  eos_token: str | None = None
  pad_token: str | None = None

  def _loaded(self):
    return _load_tokenizer(self.path)

  @property
  def tokenizer(self):
    return self._loaded()[0]

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def name(self) -> str:
    return f"hf-tokenizer-{self._loaded()[1][:16]}"

  def _special_id(self, given: str | None, key: str, candidates: tuple[str, ...]) -> int | None:
    tokenizer, _, extra = self._loaded()
    token = given or extra.get(key)
    if isinstance(token, dict):  # tokenizer_config.json may store an AddedToken dict
      token = token.get("content")
    for name in ((token,) if token else candidates):
      token_id = tokenizer.token_to_id(name)
      if token_id is not None:
        return int(token_id)
    if token:
      raise ValueError(f"{key} {token!r} is not in the tokenizer {self.path}; set "
                       f"HFTokenizerVocabulary.{key} to a token it has.")
    return None

  @property
  def eos_id(self) -> int:
    token_id = self._special_id(self.eos_token, "eos_token", _EOS_CANDIDATES)
    if token_id is None:
      raise ValueError(f"the tokenizer {self.path} has none of the usual end-of-sequence tokens "
                       f"{_EOS_CANDIDATES}; set HFTokenizerVocabulary.eos_token.")
    return token_id

  @property
  def pad_id(self) -> int:
    token_id = self._special_id(self.pad_token, "pad_token", _PAD_CANDIDATES)
    return self.eos_id if token_id is None else token_id

  def encode(self, text: str) -> np.ndarray:
    """-> int32 ids; no special tokens are added."""
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    """Stops at the first eos; special tokens are dropped."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    eos = np.flatnonzero(ids == self.eos_id)
    if eos.size:
      ids = ids[: eos[0]]
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
