"""The tokenizer files of a Hugging Face export, so that `AutoTokenizer.from_pretrained(out)` and
lm-eval's `hf` backend encode text to the ids the model was trained on.

`write_tokenizer` is called by `python -m pretrainx convert` (pretrainx -> HF): a run with a
Hugging Face tokenizer (`HFTokenizerVocabulary`) gets its tokenizer files copied; a byte-level run
(`ByteVocabulary`) gets an equivalent `tokenizers` fast tokenizer (tokenizer.json +
tokenizer_config.json, loaded by PreTrainedTokenizerFast): every string encodes to exactly the
ids of `ByteVocabulary.encode` (UTF-8 byte b -> b + num_special), with no BOS or EOS added, and
literal special-token text ('</s>') stays bytes, as in pretrainx (split_special_tokens).
"""

from __future__ import annotations

import json

from absl import logging

from pretrainx import storage
from pretrainx.vocab import ByteVocabulary, HFTokenizerVocabulary, extra_id_name

# Files of a Hugging Face tokenizer copied next to tokenizer.json when present.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
_ROLE_NAMES = (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map, the alphabet of tokenizers' ByteLevel."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
               *range(ord("\xae"), ord("\xff") + 1)]
  chars, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in chars:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _special_names(vocab: ByteVocabulary) -> dict[int, str]:
  """id -> token text of every id that is not a byte: pad/eos/unk, other special slots, extras."""
  names = {}
  for role, name in _ROLE_NAMES:
    token_id = getattr(vocab, f"{role}_id")
    if not 0 <= token_id < vocab.num_special:
      raise ValueError(f"ByteVocabulary.{role}_id={token_id} is not one of its {vocab.num_special} "
                       "special ids (below the bytes); set it below ByteVocabulary.num_special to "
                       "write a Hugging Face tokenizer.")
    names.setdefault(token_id, name)
  for token_id in range(vocab.num_special):
    names.setdefault(token_id, f"<special_{token_id}>")
  for token_id in range(256 + vocab.num_special, vocab.vocab_size):
    names[token_id] = extra_id_name(vocab, token_id)
  return names


def byte_tokenizer(vocab: ByteVocabulary):
  """A `tokenizers.Tokenizer` with the ids of `vocab`: ByteLevel characters (no regex split, no
  prefix space) through a merge-free BPE, so each UTF-8 byte is one token; the special ids are
  special added tokens; no post-processor, so nothing is appended."""
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  names = _special_names(vocab)
  ids = {char: b + vocab.num_special for b, char in _bytes_to_unicode().items()}
  ids.update({name: token_id for token_id, name in names.items()})
  tok = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token=names[vocab.unk_id]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(names[i], special=True, normalized=False)
                          for i in sorted(names)])
  return tok


def byte_tokenizer_config(vocab: ByteVocabulary, model_max_length: int) -> dict:
  """tokenizer_config.json of byte_tokenizer(vocab): no BOS (lm-eval then conditions an empty
  context on EOS, as pretrainx does), nothing added, special-token text encoded as bytes."""
  names = _special_names(vocab)
  return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": names[vocab.eos_id],
          "pad_token": names[vocab.pad_id], "unk_token": names[vocab.unk_id],
          "add_bos_token": False, "add_eos_token": False, "split_special_tokens": True,
          "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length)}


def write_byte_tokenizer(vocab: ByteVocabulary, out_dir: str, model_max_length: int
                         ) -> list[str]:
  """Writes tokenizer.json and tokenizer_config.json of `vocab` into out_dir; their paths."""
  config = json.dumps(byte_tokenizer_config(vocab, model_max_length), indent=2)
  return [storage.write_text(storage.join(out_dir, "tokenizer.json"),
                             byte_tokenizer(vocab).to_str(pretty=True)),
          storage.write_text(storage.join(out_dir, "tokenizer_config.json"), config)]


def _copy_hf_tokenizer(vocab: HFTokenizerVocabulary, out_dir: str, model_max_length: int
                       ) -> list[str]:
  """Copies the tokenizer.json (under that name) and the files beside it; without a
  tokenizer_config.json, writes one naming the vocabulary's eos/pad tokens and adding nothing,
  as pretrainx's encode does. The vocabulary's own eos_token/pad_token overrides are kept."""
  tokenizer = vocab.tokenizer
  path = storage.resolve(vocab.path)
  file = storage.join(path, "tokenizer.json") if storage.isdir(path) else path
  written = [storage.write_bytes(storage.join(out_dir, "tokenizer.json"),
                                 storage.read_bytes(file))]
  folder = storage.parent(file)
  for name in TOKENIZER_FILES:
    if storage.isfile(storage.join(folder, name)):
      written.append(storage.write_bytes(storage.join(out_dir, name),
                                         storage.read_bytes(storage.join(folder, name))))
  config_file = storage.join(out_dir, "tokenizer_config.json")
  if storage.isfile(storage.join(folder, "tokenizer_config.json")):
    config = json.loads(storage.read_text(config_file))
  else:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
              "add_eos_token": False, "model_max_length": int(model_max_length)}
    written.append(config_file)
  overrides = {"eos_token": tokenizer.id_to_token(vocab.eos_id),
               "pad_token": tokenizer.id_to_token(vocab.pad_id)}
  for key, given in (("eos_token", vocab.eos_token), ("pad_token", vocab.pad_token)):
    if given is not None or key not in config:
      config[key] = overrides[key]
  storage.write_text(config_file, json.dumps(config, indent=2))
  return written


def _copy_source_tokenizer(source: str, out_dir: str) -> list[str]:
  """The tokenizer files of the Hugging Face directory an export was imported from."""
  written = []
  for name in ("tokenizer.json", *TOKENIZER_FILES):
    if storage.isfile(storage.join(source, name)):
      written.append(storage.write_bytes(storage.join(out_dir, name),
                                         storage.read_bytes(storage.join(source, name))))
  return written


def write_tokenizer(vocabulary, out_dir: str, *, model_max_length: int,
                    source: str | None = None) -> list[str]:
  """Writes the tokenizer of a run with `vocabulary` into the HF directory out_dir; the paths.

  source: the Hugging Face directory the params were imported from (an export's meta 'source'),
  whose tokenizer files are copied when the run names no tokenizer of its own. Nothing is written
  (with a warning) for other vocabulary kinds.
  """
  if isinstance(vocabulary, HFTokenizerVocabulary):
    written = _copy_hf_tokenizer(vocabulary, out_dir, model_max_length)
  elif source is not None:
    written = _copy_source_tokenizer(source, out_dir)
    if not written:
      logging.warning("no tokenizer written to %s: the model was imported from %s, which holds "
                      "no tokenizer files; copy its tokenizer there by hand.", out_dir, source)
  elif isinstance(vocabulary, ByteVocabulary):
    written = write_byte_tokenizer(vocabulary, out_dir, model_max_length)
  else:
    logging.warning("no tokenizer written to %s: pretrainx writes tokenizers for ByteVocabulary "
                    "and HFTokenizerVocabulary, not %s; add the tokenizer files by hand.",
                    out_dir, type(vocabulary).__name__)
    written = []
  if written:
    logging.info("tokenizer (%s) written to %s", getattr(vocabulary, "name", "?"), out_dir)
  return written
