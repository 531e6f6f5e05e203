"""Vocabulary extension for a new language: learn BPE merges on the user's text and append them to
a Hugging Face tokenizer (old ids never change, new ids follow the old vocabulary), measure the
fertility before and after, and tell the model side which old tokens each new token is made of.

`pretrainx vocab extend` runs `extend_tokenizer`; train/init.py reads `new_token_pieces` and
`overlapping_tokens` (cpt/vocab.py turns them into embedding rows) after `check_extension`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

from absl import logging

from pretrainx import storage
from pretrainx.config import FileTask
from pretrainx.config.sources import source_experiment, source_kind, source_model
from pretrainx.data.tasks import iter_documents
from pretrainx.vocab import HFTokenizerVocabulary

# Files beside tokenizer.json that stay true of the extended tokenizer (the slow tokenizer's
# vocab.json / merges.txt / tokenizer.model would not: they are left out).
_KEPT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja")
HELDOUT_SHARE = 10  # without --heldout, every 10th document (or the last tenth of one) is held out


# ----------------------------------------------------------------------------- reading


def _tokenizer_json(path: str) -> tuple[dict, object]:
  """(tokenizer.json as a dict, tokenizers.Tokenizer) of a tokenizer file or the directory
  holding it; a missing file is a FileNotFoundError naming it."""
  vocab = HFTokenizerVocabulary(path)
  tok = vocab.tokenizer  # FileNotFoundError with what to pass
  return json.loads(tok.to_str()), tok


def _documents(pattern: str, heldout: str | None) -> tuple[list[str], list[str]]:
  """(training texts, held-out texts) of --data and --heldout (files: .txt, .jsonl, .parquet)."""
  task = FileTask(name="vocab-extend", train_patterns=(pattern,))
  texts = [d.text for d in iter_documents(task, "train") if d.text.strip()]
  if heldout:
    held = [d.text for d in iter_documents(FileTask(name="vocab-heldout",
                                                    train_patterns=(heldout,)), "train")]
    return texts, [t for t in held if t.strip()]
  if not texts:
    raise ValueError(f"--data {pattern} holds no text; point it at .txt, .jsonl or .parquet "
                     "files of the new language.")
  if len(texts) >= HELDOUT_SHARE:  # every HELDOUT_SHARE-th document
    last = HELDOUT_SHARE - 1
    return ([t for i, t in enumerate(texts) if i % HELDOUT_SHARE != last],
            [t for i, t in enumerate(texts) if i % HELDOUT_SHARE == last])
  if len(texts) >= 2:
    return texts[:-1], texts[-1:]
  lines = texts[0].splitlines(keepends=True)  # one document: its last tenth of lines
  cut = max(len(lines) - max(len(lines) // HELDOUT_SHARE, 1), 1)
  return ["".join(lines[:cut])], ["".join(lines[cut:])]


# ----------------------------------------------------------------------------- fertility


@dataclasses.dataclass(frozen=True)
class Fertility:
  """Tokens per whitespace-separated word and per UTF-8 byte of a text sample."""

  tokens: int
  words: int
  bytes: int

  @property
  def per_word(self) -> float:
    return self.tokens / max(self.words, 1)

  @property
  def per_byte(self) -> float:
    return self.tokens / max(self.bytes, 1)


def fertility(tokenizer, texts: Sequence[str]) -> Fertility:
  """The fertility of `tokenizer` (tokenizers.Tokenizer) on texts, no special tokens added."""
  encoded = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  return Fertility(sum(len(e.ids) for e in encoded), sum(len(t.split()) for t in texts),
                   sum(len(t.encode("utf-8")) for t in texts))


# ----------------------------------------------------------------------------- learning


def _is_byte_level(spec: dict | None) -> bool:
  """Whether a pre_tokenizer spec (tokenizer.json) is or contains ByteLevel."""
  if not spec:
    return False
  return spec.get("type") == "ByteLevel" or any(
      _is_byte_level(p) for p in spec.get("pretokenizers", ()))


def _learner(src_json: dict, src_tok, texts: Sequence[str], vocab_size: int) -> list[tuple]:
  """The merges (a, b) of a BPE learned from scratch on texts with the source's normalizer and
  pre-tokenizer, in learned order."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  model = src_json["model"]
  options = {k: model[k] for k in ("continuing_subword_prefix", "end_of_word_suffix")
             if model.get(k)}
  learner = Tokenizer(models.BPE(**options))
  learner.normalizer, learner.pre_tokenizer = src_tok.normalizer, src_tok.pre_tokenizer
  alphabet = pre_tokenizers.ByteLevel.alphabet() if _is_byte_level(
      src_json.get("pre_tokenizer")) else []
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                initial_alphabet=alphabet, **options)
  learner.train_from_iterator(texts, trainer)
  merges = json.loads(learner.to_str())["model"]["merges"]
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _pick(merges: Iterable[tuple], known: set[str], add: int, prefix: str
          ) -> tuple[list[str], list[tuple]]:
  """(new tokens, their merges): the learned merges whose result the old vocabulary lacks, in
  learned order, until `add` tokens; a part the old vocabulary lacks (a character of a new
  script, without byte-level BPE) is added as a token first."""
  known, tokens, picked = set(known), [], []
  for a, b in merges:
    token = a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)
    if token in known:
      continue
    missing = [p for p in dict.fromkeys((a, b)) if p not in known]
    if len(tokens) + len(missing) + 1 > add:
      break
    tokens += missing
    known.update(missing)
    tokens.append(token)
    known.add(token)
    picked.append((a, b))
  return tokens, picked


def _next_id(src_json: dict) -> int:
  ids = [*src_json["model"]["vocab"].values(), *(t["id"] for t in src_json["added_tokens"])]
  return max(ids, default=-1) + 1


def learn_extension(src_json: dict, src_tok, texts: Sequence[str], add: int
                    ) -> tuple[dict, list[str]]:
  """(the extended tokenizer.json, the new tokens): `add` new BPE tokens learned on texts,
  appended with their merges after the old ones (so old merges apply first: no old-token count
  grows) and ids after the old vocabulary's last id."""
  model = src_json["model"]
  if model.get("type") != "BPE":
    raise ValueError(f"the tokenizer's model is {model.get('type')}; vocab extend learns BPE "
                     "merges and needs a BPE tokenizer (GPT-2, Llama 3, Qwen2, Mistral style).")
  known = set(model["vocab"]) | {t["content"] for t in src_json["added_tokens"]}
  prefix = model.get("continuing_subword_prefix") or ""
  base = 256 if _is_byte_level(src_json.get("pre_tokenizer")) else len(
      {c for t in texts for c in t})
  budget, tokens, picked, learned = 2 * add, [], [], -1
  for _ in range(8):  # learn more merges until enough are new, or the text has no more pairs
    merges = _learner(src_json, src_tok, texts, base + budget)
    tokens, picked = _pick(merges, known, add, prefix)
    if len(tokens) >= add or len(merges) == learned:
      break
    learned, budget = len(merges), budget * 2
  if len(tokens) < add:
    logging.warning("only %d new tokens could be learned (asked for %d): the text has no more "
                    "pairs seen twice that the old vocabulary lacks.", len(tokens), add)
  out = json.loads(json.dumps(src_json))
  first = _next_id(src_json)
  out["model"]["vocab"].update({t: first + i for i, t in enumerate(tokens)})
  as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)
  out["model"]["merges"] += [f"{a} {b}" if as_text else [a, b] for a, b in picked]
  return out, tokens


def check_extends(old_tok, new_tok, old_name: str = "the source's", new_name: str = "the run's"
                  ) -> None:
  """Refuses (one line) a tokenizer that is not an extension of old_tok: fewer ids, or an old
  id whose token changed."""
  old_n, new_n = (t.get_vocab_size(with_added_tokens=True) for t in (old_tok, new_tok))
  if new_n < old_n:
    raise ValueError(f"{new_name} tokenizer has {new_n} ids, fewer than {old_name} {old_n}; "
                     "vocabulary extension only adds ids: extend the source's tokenizer with "
                     "`pretrainx vocab extend`.")
  for i in range(old_n):
    if old_tok.id_to_token(i) != new_tok.id_to_token(i):
      raise ValueError(f"{new_name} tokenizer changes old id {i} ({old_tok.id_to_token(i)!r} -> "
                       f"{new_tok.id_to_token(i)!r}); old ids must keep their tokens: extend the "
                       "source's tokenizer with `pretrainx vocab extend`.")


# ----------------------------------------------------------------------------- the command


@dataclasses.dataclass(frozen=True)
class ExtendReport:
  out: str
  added: tuple[str, ...]
  old_size: int
  new_size: int
  before: Fertility
  after: Fertility

  def summary(self) -> str:
    rows = [f"added {len(self.added)} tokens: ids {self.old_size}..{self.new_size - 1} "
            f"(vocabulary {self.old_size} -> {self.new_size}); tokenizer written to {self.out}",
            f"fertility on held-out text ({self.before.words:,} words, {self.before.bytes:,} "
            "bytes):", f"  {'':8}{'tokens':>10}{'tokens/word':>13}{'tokens/byte':>13}"]
    for name, f in (("before", self.before), ("after", self.after)):
      rows.append(f"  {name:8}{f.tokens:>10,}{f.per_word:>13.3f}{f.per_byte:>13.4f}")
    return "\n".join(rows)


def extend_tokenizer(tokenizer: str, data: str, add: int, out: str,
                     heldout: str | None = None) -> ExtendReport:
  """Learns `add` tokens on the files `data` matches, writes the extended tokenizer (and the
  source's tokenizer_config.json etc.) into `out`, and measures fertility on held-out text."""
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  if add < 1:
    raise ValueError(f"--add={add}; pass the number of new tokens to learn (>= 1).")
  src_json, src_tok = _tokenizer_json(tokenizer)
  train, held = _documents(data, heldout)
  new_json, tokens = learn_extension(src_json, src_tok, train, add)
  new_tok = Tokenizer.from_str(json.dumps(new_json))
  check_extends(src_tok, new_tok, "the source", "the extended")
  storage.makedirs(out)
  storage.write_text(storage.join(out, "tokenizer.json"), new_tok.to_str(pretty=True))
  folder = storage.resolve(tokenizer)
  folder = folder if storage.isdir(folder) else storage.parent(folder)
  for name in _KEPT_FILES:
    if storage.isfile(storage.join(folder, name)):
      storage.write_bytes(storage.join(out, name), storage.read_bytes(storage.join(folder, name)))
  return ExtendReport(out, tuple(tokens), src_tok.get_vocab_size(with_added_tokens=True),
                      new_tok.get_vocab_size(with_added_tokens=True), fertility(src_tok, held),
                      fertility(new_tok, held))


# ----------------------------------------------------------------------------- the model side


def source_tokenizer(init) -> HFTokenizerVocabulary:
  """The tokenizer the source model was trained with: InitConfig.extend_vocab_from, or with
  'source' the source's own (a Hugging Face directory's tokenizer.json, a pretrainx run's
  DataConfig.vocabulary)."""
  if init.extend_vocab_from != "source":
    return HFTokenizerVocabulary(init.extend_vocab_from)
  if source_kind(init.source) == "hf":
    return HFTokenizerVocabulary(init.source)
  vocab = source_experiment(init.source, init.step)[0].data.vocabulary
  if not isinstance(vocab, HFTokenizerVocabulary):
    raise ValueError(f"the source {init.source} was trained with {type(vocab).__name__}, not a "
                     "Hugging Face tokenizer; set InitConfig.extend_vocab_from to its tokenizer.")
  return vocab


def check_extension(exp) -> tuple[HFTokenizerVocabulary, HFTokenizerVocabulary]:
  """(source tokenizer, run tokenizer) of a run with InitConfig.extend_vocab_from, after
  refusing (one line) a run vocabulary that is not an extension of the source's."""
  init, run_vocab = exp.init, exp.data.vocabulary
  if not isinstance(run_vocab, HFTokenizerVocabulary):
    raise ValueError("InitConfig.extend_vocab_from needs DataConfig.vocabulary to be the extended "
                     f"HFTokenizerVocabulary, not {type(run_vocab).__name__}.")
  src_vocab_size = source_model(init.source, init.step).vocab_size
  if exp.model.vocab_size < src_vocab_size:
    raise ValueError(f"ModelConfig.vocab_size={exp.model.vocab_size} is smaller than the "
                     f"source's {src_vocab_size}; vocabulary extension only adds ids: set it to "
                     "the extended tokenizer's size or more.")
  old = source_tokenizer(init)
  check_extends(old.tokenizer, run_vocab.tokenizer)
  return old, run_vocab


def new_token_pieces(old_tok, new_tok, start: int, stop: int) -> list[list[int]]:
  """For each new id in [start, stop): its old-token ids, the old tokenizer's BPE applied to the
  new token's string (for byte-level BPE exactly its bytes' merges); [] for an id with no token."""
  pieces = []
  for token_id in range(start, stop):
    token = new_tok.id_to_token(token_id)
    ids: list[int] = []
    if token is not None:
      try:
        ids = [t.id for t in old_tok.model.tokenize(token)]
      except Exception:  # pylint: disable=broad-except  # a character the old model lacks
        ids = []
      if not ids:
        ids = old_tok.encode(new_tok.decode([token_id]), add_special_tokens=False).ids
    pieces.append([i for i in ids if i < start])
  return pieces


def overlapping_tokens(old_tok, new_tok, start: int, stop: int) -> list[list[int]]:
  """For each new id in [start, stop): the old model-vocabulary tokens whose string occurs inside
  the new token's string (FOCUS's candidates; special added tokens are never candidates)."""
  vocab = old_tok.get_vocab(with_added_tokens=False)
  out = []
  for token_id in range(start, stop):
    token = new_tok.id_to_token(token_id) or ""
    subs = {token[i:j] for i in range(len(token)) for j in range(i + 1, len(token) + 1)}
    out.append(sorted(vocab[s] for s in subs if s in vocab and vocab[s] < start))
  return out
