"""Downstream evaluation speed: pretrainx's lm-eval LM against lm-eval's own `hf` backend on the
same model, and KV-cache decoding against recomputing the whole buffer.

The model has quickstart shapes (d256, 4 layers, 4 heads, 2 kv heads, fp32) with random weights,
exported to Hugging Face format with a byte-level BPE tokenizer trained here, so that both
backends load the same weights and tokenize alike. Prints markdown tables.
Run: .venv/bin/python bench/eval.py [--requests 256 --gen_requests 16 --gen_tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this have "
         "from or one had by word but not what all were we when your can said there use an each "
         "which she do how their if will up other about out many then them these so").split()


def make_model(work: str, vocab_size: int = 2048, max_len: int = 512):
  from flax.core import meta
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from pretrainx import hf
  from pretrainx.vocab import HFTokenizerVocabulary
  from pretrainx.config import ModelConfig
  from pretrainx.model import Transformer

  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(WORDS, 200)) for _ in range(200)]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  hf_dir = os.path.join(work, "hf")
  os.makedirs(hf_dir)
  tok.save(os.path.join(hf_dir, "tokenizer.json"))
  with open(os.path.join(hf_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
               "pad_token": "<pad>"}, f)
  cfg = ModelConfig(vocab_size=tok.get_vocab_size(), embed_dim=256, num_layers=4, num_heads=4,
                    num_kv_heads=2, mlp_dim=768, max_seq_len=max_len, dtype="float32",
                    tie_embeddings=False)
  model = Transformer(cfg)
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
  params = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32),
                        shapes)
  hf.export_hf(params, cfg, hf_dir)
  return model, params, HFTokenizerVocabulary(hf_dir), hf_dir, texts


def instances(kind: str, args_list):
  from lm_eval.api.instance import Instance

  return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
          for i, a in enumerate(args_list)]


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - t0, out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--requests", type=int, default=256)
  parser.add_argument("--gen_requests", type=int, default=16)
  parser.add_argument("--gen_tokens", type=int, default=64)
  parser.add_argument("--max_length", type=int, default=256)
  args = parser.parse_args()
  from lm_eval.models.huggingface import HFLM

  from pretrainx.generate import generate_batch
  from pretrainx.harness.lm import make_lm

  work = tempfile.mkdtemp(prefix="bench-eval-")
  try:
    model, params, vocab, hf_dir, texts = make_model(work)
    rng = np.random.default_rng(1)
    ll = [(" ".join(rng.choice(WORDS, 40)), " " + " ".join(rng.choice(WORDS, 4)))
          for _ in range(args.requests)]
    gen = [(" ".join(rng.choice(WORDS, 30)), {"until": ["\n\n\n"], "max_gen_toks": args.gen_tokens,
                                              "do_sample": False})
           for _ in range(args.gen_requests)]
    ours = make_lm(model, params, vocab, max_length=args.max_length, batch_rows=16)
    theirs = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=16,
                  max_length=args.max_length)
    rows = []
    for name, lm in (("pretrainx", ours), ("lm-eval hf", theirs)):
      lm.loglikelihood(instances("loglikelihood", ll))  # warm-up: compile these shapes
      lm.generate_until(instances("generate_until", gen))
      t_ll, _ = timed(lm.loglikelihood, instances("loglikelihood", ll))
      t_gen, texts_out = timed(lm.generate_until, instances("generate_until", gen))
      new_tokens = sum(len(vocab.encode(t)) for t in texts_out)
      rows.append((name, len(ll) / t_ll, new_tokens / t_gen, new_tokens))
    print(f"lm-eval requests on one model (d256, L4, fp32, random weights), {os.cpu_count()} "
          f"cores; max_length {args.max_length}\n")
    print("| backend | loglikelihood requests/s | generated tokens/s | tokens generated |")
    print("|---|---|---|---|")
    for name, rps, tps, n in rows:
      print(f"| {name} | {rps:,.1f} | {tps:,.1f} | {n:,} |")
    print(f"| pretrainx / hf | {rows[0][1] / rows[1][1]:.2f}x | {rows[0][2] / rows[1][2]:.2f}x "
          "| |")

    prompt = [np.asarray(vocab.encode(" ".join(rng.choice(WORDS, 24))), np.int32)]
    speed = []
    for kv in (True, False):
      kwargs = dict(rng=jax.random.key(0), temperature=0.0, kv_cache=kv)
      generate_batch(model, params, prompt, 256, **kwargs)  # compile
      seconds, out = timed(lambda: generate_batch(model, params, prompt, 256, **kwargs))
      speed.append((kv, seconds, len(out[0])))
    print("\nGreedy decoding of 256 new tokens after a 24-token prompt, batch 1\n")
    print("| decoder | seconds | tokens/s |\n|---|---|---|")
    for kv, seconds, n in speed:
      print(f"| {'KV cache' if kv else 'recompute the buffer'} | {seconds:.2f} | "
            f"{n / seconds:,.1f} |")
    print(f"| speedup | {speed[1][1] / speed[0][1]:.1f}x | |")
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
