"""lm-evaluation-harness's LM API on a pretrainx model: loglikelihood, loglikelihood_rolling and
generate_until, over a TokenScorer (packed, batched, sharded) and the KV-cache generator.

Requests are tokenized exactly as lm-eval's `hf` backend does (its TemplateLM encodes context and
continuation), so a pretrainx model and its Hugging Face export score the same numbers. Every host
runs every request: the batches are sharded over all devices of all hosts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from lm_eval.api.model import TemplateLM

from pretrainx.harness.scoring import TokenScorer, rolling_windows


class PretrainxLM(TemplateLM):
  """An lm-eval LM; `generate(prompts, max_new_tokens, temperature, stop) -> [new ids]` decodes."""

  def __init__(self, scorer: TokenScorer, vocabulary, generate: Callable[..., list[np.ndarray]],
               max_length: int, max_gen_toks: int = 256, name: str = "pretrainx"):
    super().__init__()
    self.scorer, self.vocab, self._generate = scorer, vocabulary, generate
    self._max_length, self._max_gen_toks, self.name = max_length, max_gen_toks, name

  # -- what TemplateLM needs --------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return int(self.vocab.eos_id)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return self.vocab.name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # pretrainx vocabularies add no special tokens
    return [int(t) for t in self.vocab.encode(string)]

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self.vocab.decode(np.asarray(tokens, np.int32))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    scored = self.scorer.score([(ctx, cont) for _, ctx, cont in requests])
    out = []
    for (key, _, _), s in zip(requests, scored):
      answer = (s.total, bool(s.greedy.all()))
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  # -- the other two request types --------------------------------------------------------------

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for pair in rolling_windows(self.tok_encode(string), self.prefix_token_id,
                                  self.max_length):
        windows.append(pair)
        owner.append(i)
    totals = np.zeros(len(requests), np.float64)
    for i, s in zip(owner, self.scorer.score(windows)):
      totals[i] += s.total
    out = [float(t) for t in totals]
    for req, value in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, value)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy or sampled continuations, cut at the first stop string (`until`)."""
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):  # one batch per distinct generation setting
      groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
    out: list[str | None] = [None] * len(requests)
    for members in groups.values():
      kwargs = dict(requests[members[0]].args[1])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen = int(kwargs.pop("max_gen_toks", self._max_gen_toks))
      sample = bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
      temperature = temperature if sample or temperature > 0 else 0.0
      room = max(1, self.max_length - max_gen)
      prompts = [np.asarray(self.tok_encode(requests[i].args[0])[-room:], np.int32)
                 for i in members]

      terms = [t for t in until if t]
      # A stop string that ends at the newest token lies within its last few tokens (every token
      # decodes to at least one byte); earlier tokens were checked when they came.
      tail = 4 * max((len(t.encode()) for t in terms), default=0) + 4

      def stop(row: int, ids: np.ndarray) -> bool:
        del row
        text = self.tok_decode(ids[-tail:]) if terms else ""
        return any(term in text for term in terms)

      rows = self.scorer.batch_rows  # prompts per decoding batch
      generated = [ids for start in range(0, len(prompts), rows)
                   for ids in self._generate(prompts[start:start + rows], max_gen, temperature,
                                             stop if terms else None)]
      for i, ids in zip(members, generated):
        text = self.tok_decode(ids)
        for term in until:
          if term:
            text = text.split(term)[0]
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out  # type: ignore[return-value]


def make_lm(model, params: Any, vocabulary, *, max_length: int, batch_rows: int,
            sharding=None, scope=None, max_gen_toks: int = 256, seed: int = 0) -> PretrainxLM:
  """A PretrainxLM over `model` and `params` (placed on the mesh, if any)."""
  import jax  # pylint: disable=import-outside-toplevel

  from pretrainx.generate import generate_batch  # pylint: disable=import-outside-toplevel

  scorer = TokenScorer(model, params, max_length, batch_rows, sharding, scope)
  calls = [0]

  def generate(prompts, max_new_tokens, temperature, stop):
    calls[0] += 1
    with scorer.scope():
      return generate_batch(model, params, prompts, max_new_tokens,
                            rng=jax.random.fold_in(jax.random.key(seed), calls[0]),
                            temperature=temperature, eos_id=int(vocabulary.eos_id), stop=stop)

  return PretrainxLM(scorer, vocabulary, generate, max_length, max_gen_toks)
