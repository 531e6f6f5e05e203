"""The model with each attention_impl: packed documents stay apart, 'flash' and full-window 'hybrid'
equal 'reference', prefix-LM masks, training steps, the one-time fallback warning, bad inputs.

Tiny models (embed 32, 2 layers, seq 32); the Pallas kernels run in interpret mode where asked.
"""

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import meta

from pallas_kernels.reference import attention_mask, reference_attention
from pallas_kernels.softmax_vjp import softmax_attention
from pretrainx.config import ModelConfig
from pretrainx.model import Transformer
from pretrainx.flops import count_params
from pretrainx.model import attention as attn
from pretrainx.config import model as model_config

SEQ = 32
CFG = ModelConfig(vocab_size=259, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  mlp_dim=64, max_seq_len=SEQ, linear_feature_dim=8, linear_chunk=8,
                  attention_window=8)
DOCS = ((10, 22), (5, 12, 15))  # document lengths of the two packed rows
IMPLS = ("reference", "flash", "linear", "hybrid")


def cfg_for(impl, **overrides):
  return dataclasses.replace(CFG, attention_impl=impl, **overrides)


def packed_batch():
  """tokens, positions, segment_ids [2, SEQ]: each row packs whole documents."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 259, (2, SEQ)).astype(np.int32)
  seg = np.stack([np.repeat(np.arange(1, len(d) + 1), d) for d in DOCS])
  pos = np.stack([np.concatenate([np.arange(n) for n in d]) for d in DOCS])
  return jnp.asarray(tokens), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def random_params(cfg, seed=0):
  """(model, params) of init's shapes, drawn by numpy (no compilation): every parameter, the
  hedgehog maps, window factors and decays included, is away from its init value."""
  model = Transformer(cfg)
  shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  flat = {path: (1.0 if path[-1] == "scale" else 0.0) + 0.2 * rng.standard_normal(x.shape)
          for path, x in traverse_util.flatten_dict(shapes).items()}
  return model, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                             traverse_util.unflatten_dict(flat))


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(Transformer(cfg).apply)


def restrict(params, like):
  """The entries of `params` whose paths exist in `like` (drop impl-specific parameters)."""
  flat, keep = traverse_util.flatten_dict(params), traverse_util.flatten_dict(like)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in keep})


def forward(model, params, *args):
  return _jitted_apply(model.cfg)({"params": params}, *args)


def assert_close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_packed_documents_equal_documents_alone(impl):
  """Each impl: finite logits of the right shape; a packed document's logits equal its logits
  as the first (unpacked) document of a row: nothing crosses a segment boundary."""
  cfg = cfg_for(impl, linear_decay=impl == "linear")
  model, params = random_params(cfg)
  tokens, pos, seg = packed_batch()
  packed = forward(model, params, tokens, pos, seg)
  assert packed.shape == (2, SEQ, cfg.padded_vocab_size)
  assert bool(jnp.all(jnp.isfinite(packed)))
  # Causal models ignore what follows, so a row that starts with the document runs it "alone".
  starts = [(0, 0, 10), (0, 10, 22), (1, 0, 5), (1, 5, 12), (1, 17, 15)]  # (row, start, length)
  alone_tokens = jnp.stack([jnp.roll(tokens[r], -s) for r, s, _ in starts])
  alone = forward(model, params, alone_tokens)  # no segment_ids: one document per row
  for i, (r, s, n) in enumerate(starts):
    assert_close(packed[r, s:s + n], alone[i, :n], 2e-5)


def test_hybrid_full_window_equals_reference():
  """With attention_window >= seq there are no linear terms: softmax whatever the mixing."""
  # random window factors and hedgehog maps: irrelevant with a full window
  hybrid, params = random_params(cfg_for("hybrid", attention_window=SEQ))
  reference, ref_params = random_params(cfg_for("reference"))
  tokens, pos, seg = packed_batch()
  want = forward(reference, restrict(params, ref_params), tokens, pos, seg)
  assert_close(forward(hybrid, params, tokens, pos, seg), want, 2e-5)
  # ...and a short window does change the logits (the comparison can fail).
  short = Transformer(cfg_for("hybrid", attention_window=4))
  assert not np.allclose(np.asarray(forward(short, params, tokens, pos, seg)), np.asarray(want),
                         atol=1e-3)


@pytest.mark.parametrize("interpret", [True, False])
def test_flash_equals_reference(interpret):
  """The Pallas kernel (interpret mode) and the pure-JAX fallback, with segments and a prefix."""
  flash, params = random_params(cfg_for("flash", kernel_interpret=interpret, flash_block_q=8,
                                        flash_block_k=16))
  reference = Transformer(cfg_for("reference"))
  tokens, pos, seg = packed_batch()
  prefix = pos < 4  # the first 4 tokens of every document are a bidirectional prefix
  for args in ((tokens, pos, seg), (tokens, pos, seg, prefix)):
    assert_close(forward(flash, params, *args), forward(reference, params, *args), 2e-5)


def test_prefix_mask_semantics():
  """A prefix token is seen by earlier tokens of its document only; nothing else changes."""
  model, params = random_params(cfg_for("reference"))
  tokens, pos, seg = packed_batch()
  prefix = pos < 6
  run = lambda toks, prefix_mask=None: forward(model, params, toks, pos, seg, prefix_mask)
  base = run(tokens, prefix)
  in_prefix = tokens.at[0, 4].set((tokens[0, 4] + 1) % 259)  # doc 1 of row 0, inside its prefix
  changed = run(in_prefix, prefix)
  assert not np.allclose(np.asarray(changed[0, :4]), np.asarray(base[0, :4]), atol=1e-4)
  assert_close(changed[0, 10:], base[0, 10:], 1e-6)  # the next document does not see it
  assert_close(changed[1], base[1], 1e-6)
  assert_close(run(in_prefix)[0, :4], run(tokens)[0, :4], 1e-6)  # causal without the prefix
  after_prefix = tokens.at[0, 8].set((tokens[0, 8] + 1) % 259)  # doc 1, after its prefix
  assert_close(run(after_prefix, prefix)[0, :8], base[0, :8], 1e-6)
  assert_close(run(tokens, jnp.zeros_like(prefix)), run(tokens), 1e-6)  # empty prefix: causal


def test_attention_mask_formula():
  """mask(i, j) = same_segment & (j <= i | prefix[j]) & i - j < window, element by element."""
  seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
  prefix = np.array([[1, 1, 0, 0, 1, 0, 0, 0]], bool)
  got = np.asarray(attention_mask(8, 8, causal=True, q_segment_ids=jnp.asarray(seg),
                                  kv_segment_ids=jnp.asarray(seg), sliding_window=3,
                                  prefix_mask=jnp.asarray(prefix)))[0]
  want = np.array([[seg[0, i] == seg[0, j] and (j <= i or prefix[0, j]) and i - j < 3
                    for j in range(8)] for i in range(8)])
  np.testing.assert_array_equal(got, want)
  assert got[0, 1] and not got[0, 2] and not got[3, 4]


def test_linear_kernel_path_equals_pure_jax_path():
  """kernel_interpret=True dispatches unpacked rows to the Pallas kernel: same logits."""
  model, params = random_params(cfg_for("linear", linear_decay=True))
  tokens = packed_batch()[0]
  kernel = Transformer(cfg_for("linear", linear_decay=True, kernel_interpret=True))
  assert_close(forward(kernel, params, tokens), forward(model, params, tokens), 2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_model_trains(impl):
  """From model.init, a few Adam steps on one packed batch reduce the loss."""
  model = Transformer(cfg_for(impl))
  tokens, pos, seg = packed_batch()
  targets = jnp.roll(tokens, -1, axis=1)
  optimizer = optax.adam(3e-3)

  def loss_fn(params):
    logits = model.apply({"params": params}, tokens, pos, seg)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  def step(carry, _):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def train(key):  # init and steps in one compilation
    params = meta.unbox(model.init(key, tokens[:, :8])["params"])
    return jax.lax.scan(step, (params, optimizer.init(params)), length=6)[1]

  losses = np.asarray(train(jax.random.key(0)))
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("impl,used", [("flash", "blockwise_attention_jax"),
                                       ("linear", "linear_attention_jax")])
def test_fallback_warns_once(impl, used, caplog, monkeypatch):
  monkeypatch.setattr(attn, "_WARNED", set())
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 16, 4, 8)), jnp.float32)
  k = v = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
  cfg = cfg_for(impl, linear_feature="elu+1")
  with caplog.at_level(logging.WARNING):
    quiet = attn.dot_product_attention(q, k, v, None, cfg=dataclasses.replace(
        cfg, kernel_interpret=True))
    assert not caplog.records  # the kernel ran (interpret mode): nothing to announce
    outs = [attn.dot_product_attention(q[:, :n], k[:, :n], v[:, :n], None, cfg=cfg)
            for n in (16, 16, 12)]
  assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
  message = caplog.records[0].getMessage()
  assert f"attention_impl={impl!r}" in message and "'cpu'" in message and used in message
  assert_close(outs[0], quiet, 2e-5)


def test_param_counts_include_attention_parameters():
  for cfg in (cfg_for("linear", linear_decay=True), cfg_for("hybrid"),
              cfg_for("linear", linear_feature="taylor")):
    _, params = random_params(cfg)
    n = sum(x.size for x in jax.tree.leaves(params))
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.embed_dim
    assert n == count_params(cfg)["total"] + padding, cfg
  assert tuple(attn.ATTENTION_IMPLS) == model_config.ATTENTION_IMPLS


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown attention_impl 'softmax'; choose one of"):
    cfg_for("softmax")
  with pytest.raises(ValueError, match="linear_feature='cosformer'.*hedgehog"):
    cfg_for("linear", linear_feature="cosformer")
  with pytest.raises(ValueError, match="attention_window=64 exceeds max_seq_len=32"):
    cfg_for("hybrid", attention_window=64)
  with pytest.raises(ValueError, match="linear_decay=True is not supported by"):
    cfg_for("hybrid", linear_decay=True)
  with pytest.raises(ValueError, match="linear_chunk=0 must be a positive"):
    cfg_for("linear", linear_chunk=0)
  tokens, pos, seg = packed_batch()
  for impl in ("linear", "hybrid"):
    model, params = random_params(cfg_for(impl))
    with pytest.raises(ValueError, match=f"prefix_mask .* attention_impl='{impl}'.*'reference'"):
      model.apply({"params": params}, tokens, pos, seg, pos < 3)
  with pytest.raises(ValueError, match="unknown attention_impl 'nope'"):
    attn.dot_product_attention(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)),
                               jnp.zeros((1, 4, 2, 8)), None, impl="nope")
  model, params = random_params(cfg_for("reference"))
  with pytest.raises(ValueError, match="decoding 32 tokens at once into a KV cache of cache_len=16"):
    Transformer(model.cfg, cache_len=16).apply({"params": params}, tokens, pos, decode=True,
                                               mutable=["cache"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_softmax_vjp_equals_the_reference_forward_and_gradients(dtype, tol):
  rng = np.random.default_rng(3)
  q, w = (jnp.asarray(rng.standard_normal((2, 16, 4, 8)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), dtype) for _ in range(2))
  seg = jnp.asarray([[1] * 5 + [2] * 9 + [0] * 2, [1] * 16], jnp.int32)  # padding, two documents
  prefix = jnp.asarray([[True] * 3 + [False] * 13, [False] * 16])
  # chunk=4 or 5: causal masks run as query chunks, each against the keys up to its last row
  # (with 5, a ragged last chunk).
  # In bf16 the reference is the fp32 function of the same inputs: the bf16 reference rounds at
  # other points (the normalised probabilities, where this path rounds the unnormalised
  # exponentials), and the two land on either side of the fp32 value, up to 2 bf16 ulps apart.
  exact = lambda x: x.astype(jnp.float32)
  for kw in ({}, {"segment_ids": seg}, {"segment_ids": seg, "prefix_mask": prefix},
             {"chunk": 4}, {"segment_ids": seg, "chunk": 5},
             {"segment_ids": seg, "prefix_mask": prefix, "chunk": 4}):
    ref = lambda q, k, v, kw=kw: reference_attention(
        exact(q), exact(k), exact(v), causal=True, q_segment_ids=kw.get("segment_ids"),
        kv_segment_ids=kw.get("segment_ids"), prefix_mask=kw.get("prefix_mask"))
    ours = lambda q, k, v, kw=kw: softmax_attention(q, k, v, **kw)
    out = ours(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.float32(out), np.float32(ref(q, k, v)), rtol=tol, atol=tol)
    loss = lambda f: lambda q, k, v: jnp.sum(exact(w) * exact(f(q, k, v)))
    for a, b in zip(jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v),
                    jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
      assert a.dtype == b.dtype == dtype
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)


def test_causal_attention_skips_the_blocks_above_the_diagonal():
  from pallas_kernels.softmax_vjp import chunk_plan  # pylint: disable=import-outside-toplevel
  assert chunk_plan(512, 512, causal_only=True) == tuple((i, i + 64, i + 64)
                                                         for i in range(0, 512, 64))
  assert chunk_plan(100, 100, causal_only=True) == ((0, 32, 32), (32, 64, 64), (64, 96, 96),
                                                    (96, 100, 100))  # a ragged last chunk
  # A prefix sees later keys, a cache offsets the queries, a short sequence is one chunk: each
  # runs as one chunk over all keys.
  for args in ((512, 512, False), (128, 512, True), (32, 32, True)):
    assert chunk_plan(*args) == ((0, args[0], args[1]),)


def test_sliding_window_paths_agree_forward_and_gradients():
  """ModelConfig.sliding_window in every softmax path (the CPU-tuned and accelerator graphs of
  'reference', the Pallas 'flash' kernel in interpret mode, its pure-JAX fallback) against the
  mask written out (i - window < j <= i, same segment), output and gradients, packed rows."""
  from pretrainx.model import kernels  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(5)
  q, ct = (jnp.asarray(rng.standard_normal((2, SEQ, 4, 8)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((2, SEQ, 2, 8)), jnp.float32) for _ in range(2))
  seg = packed_batch()[2]
  window = 5
  i, j = np.arange(SEQ)[:, None], np.arange(SEQ)[None, :]
  mask = (j <= i) & (j > i - window) & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None])

  def written_out(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * 8**-0.5
    p = jax.nn.softmax(jnp.where(jnp.asarray(mask)[:, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, 2, axis=2))

  def run(impl, graph="cpu", **overrides):
    cfg = cfg_for(impl, **{"sliding_window": window, "flash_block_q": 8, "flash_block_k": 8,
                           **overrides})
    fn = lambda q, k, v: attn.dot_product_attention(q, k, v, seg, cfg=cfg)
    with kernels.graph(graph):
      return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *b: jnp.sum(fn(*b) * ct), (0, 1, 2))(*a)))(
          q, k, v)

  want = (written_out(q, k, v),
          jax.grad(lambda *a: jnp.sum(written_out(*a) * ct), (0, 1, 2))(q, k, v))
  for got in (run("reference"), run("reference", "accelerator"),
              run("flash", kernel_interpret=True), run("flash")):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, 2e-5)
  # the window binds here: without it the output differs
  assert not np.allclose(np.asarray(run("reference", sliding_window=None)[0]),
                         np.asarray(want[0]), atol=1e-3)


def test_sliding_window_kv_cache_decoding_equals_the_forward():
  """Decoding token by token with a KV cache keeps only the last `window` keys in view."""
  model, params = random_params(cfg_for("reference", sliding_window=4))
  tokens = packed_batch()[0][:, :12]
  want = forward(model, params, tokens)
  step = jax.jit(functools.partial(model.apply, decode=True, mutable=["cache"]))
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0),
                          tokens[:, :1], jnp.zeros((2, 1), jnp.int32))["cache"]
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # what init gives
  got = []
  for t in range(tokens.shape[1]):
    logits, state = step({"params": params, "cache": cache}, tokens[:, t:t + 1],
                         jnp.full((2, 1), t, jnp.int32))
    cache, got = state["cache"], got + [logits]
  assert_close(jnp.concatenate(got, axis=1), want, 2e-5)


def test_sliding_window_is_refused_where_it_does_not_apply():
  for impl in ("linear", "hybrid"):
    with pytest.raises(ValueError, match=r"sliding_window=8 applies to softmax attention .*"
                       r"attention_window"):
      cfg_for(impl, sliding_window=8)
  with pytest.raises(ValueError, match="sliding_window=0; use a positive"):
    cfg_for("reference", sliding_window=0)
