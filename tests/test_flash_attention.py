"""Flash attention: the Pallas kernels (interpret mode on CPU) and the pure-JAX blockwise path
against the materialised reference, forward and gradients, over causal / packed segments / GQA /
sliding window / soft-cap / prefix-LM masks, padded lengths, bf16, empty rows and bad inputs.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import abstract_gpu_mesh
from pallas_kernels import flash_attention as fa
from pallas_kernels.reference import reference_attention

HEAD_DIM, KV_HEADS = 16, 1


def make_inputs(batch=1, seq=64, groups=2, head_dim=HEAD_DIM, dtype=jnp.float32, seed=0,
                kv_heads=KV_HEADS):
  """q [b, t, kvh * groups, d], k/v [b, t, kvh, d], a cotangent like q, and segment ids."""
  rng = np.random.default_rng(seed)  # numpy, so that new shapes cost no compilation
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = normal(batch, seq, kv_heads * groups, head_dim).astype(dtype)
  k = normal(batch, seq, kv_heads, head_dim).astype(dtype)
  v = normal(batch, seq, kv_heads, head_dim).astype(dtype)
  # Packed documents: segment boundaries at different places in each batch row.
  cuts = [np.sort(rng.choice(np.arange(1, seq), size=3, replace=False)) for _ in range(batch)]
  segs = jnp.asarray(np.stack([np.searchsorted(c, np.arange(seq), side="right") for c in cuts]))
  return q, k, v, normal(*q.shape), segs


def explicit_mask(seq, *, causal, segs=None, prefix=None, window=None):
  """[batch or 1, seq, seq] bool straight from the definition (no code shared with the kernels)."""
  i, j = jnp.arange(seq)[:, None], jnp.arange(seq)[None, :]
  visible = (j <= i) if causal else jnp.ones((seq, seq), bool)
  if prefix is not None:
    visible = visible[None] | jnp.asarray(prefix, bool)[:, None, :]
  if window is not None:
    visible = visible & (i - j < window)
  if segs is not None:
    visible = visible & (segs[:, :, None] == segs[:, None, :])
  return jnp.broadcast_to(visible, (1,) * (3 - visible.ndim) + visible.shape)


def masked_softmax_attention(q, k, v, mask, softcap=None):
  """Dense fp32 attention with an explicit mask [b, t, t]; empty rows give zeros."""
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (k, v))
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * q.shape[-1]**-0.5
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask[:, None], s, -jnp.inf)
  p = jnp.nan_to_num(jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)))
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def reference(q, k, v, *, segment_ids=None, **kw):
  return reference_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, **kw)


def value_and_grads(fn, q, k, v, ct, **kw):
  """(out, (dq, dk, dv)) of sum(fn(q, k, v) * ct), all fp32."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * ct)
  out = fn(q, k, v, **kw)
  return out.astype(jnp.float32), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=("options", "blocks"))
def all_impls(q, k, v, ct, segs, prefix, *, options, blocks):
  """(flash, blockwise, reference) (out, grads) and the explicit-mask output.

  options: tuple of (name, value) pairs: causal, sliding_window, logit_softcap, and the flags
  segments / prefix, which pass `segs` / `prefix` as segment_ids / prefix_mask.
  """
  kw = dict(options)
  kw.update(segment_ids=segs if kw.pop("segments", False) else None,
            prefix_mask=prefix if kw.pop("prefix", False) else None)
  block = dict(block_q=blocks[0], block_k=blocks[1])
  mask = explicit_mask(q.shape[1], causal=kw["causal"], segs=kw["segment_ids"],
                       prefix=kw["prefix_mask"], window=kw.get("sliding_window"))
  as32 = lambda x: x.astype(jnp.float32)
  return (value_and_grads(fa.flash_attention, q, k, v, ct, **kw, **block),
          value_and_grads(fa.blockwise_attention_jax, q, k, v, ct, **kw, **block),
          value_and_grads(reference, as32(q), as32(k), as32(v), ct, **kw),
          masked_softmax_attention(q, k, v, mask, kw.get("logit_softcap")))


def assert_close(actual, expected, tol):
  """Leaf by leaf: |a - e| <= tol * max(1, max|e|)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    scale = max(1.0, float(jnp.max(jnp.abs(e))))
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=0,
                               atol=tol * scale)


# (options, groups, batch, seq, (block_q, block_k)); every mask feature with GQA 1, 2, 4, seq 100
# (not a multiple of the blocks) and unequal blocks spread over the cases, since each case is a
# separate interpret-mode compilation.
CASES = [
    ((("causal", True),), 1, 1, 64, (32, 32)),
    ((("causal", False), ("logit_softcap", 2.0)), 2, 1, 100, (32, 32)),
    ((("causal", True), ("segments", True)), 4, 2, 100, (32, 16)),
    ((("causal", False), ("segments", True), ("sliding_window", 9)), 1, 2, 64, (16, 32)),
    ((("causal", True), ("sliding_window", 24)), 2, 1, 100, (16, 32)),
    ((("causal", True), ("prefix", True), ("segments", True)), 2, 2, 100, (32, 16)),
    ((("causal", True), ("prefix", True), ("sliding_window", 20), ("logit_softcap", 5.0)), 4, 1,
     64, (16, 32)),
    ((("causal", True), ("segments", True)), 8, 1, 100, (32, 16)),  # llama_70b's GQA: 8 groups
]


@pytest.mark.slow
@pytest.mark.parametrize("options,groups,batch,seq,blocks", CASES)
def test_matches_reference_fp32(options, groups, batch, seq, blocks):
  q, k, v, ct, segs = make_inputs(batch=batch, seq=seq, groups=groups, seed=seq + groups)
  # A prefix of 12 tokens, plus a few scattered prefix keys (also ahead of their queries).
  prefix = (jnp.arange(seq) < 12) | (jnp.arange(seq) % 29 == 5)
  prefix = jnp.broadcast_to(prefix, (batch, seq)).astype(jnp.int32)
  flash, blockwise, ref, dense = all_impls(q, k, v, ct, segs, prefix, options=options,
                                           blocks=blocks)
  chex.assert_trees_all_equal_shapes_and_dtypes(flash, ref)
  assert_close(flash, ref, 2e-5)
  assert_close(blockwise, ref, 2e-5)
  assert_close(flash[0], dense, 2e-5)  # the mask semantics from their definition, not the reference


@pytest.mark.slow
@pytest.mark.parametrize("groups,options", [(2, (("causal", True), ("segments", True))),
                                            (4, (("causal", False), ("logit_softcap", 3.0)))])
def test_bf16_matches_fp32_reference(groups, options):
  q, k, v, ct, segs = make_inputs(seq=100, groups=groups, dtype=jnp.bfloat16, seed=7)
  flash, blockwise, ref, _ = all_impls(q, k, v, ct, segs, segs, options=options, blocks=(32, 32))
  assert jax.eval_shape(fa.flash_attention, q, k, v).dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in flash[1])
  assert_close(flash, ref, 3e-2)
  assert_close(blockwise, ref, 3e-2)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_gqa_8_groups_over_2_kv_heads_matches_reference(backend):
  """Both kernel layouts in the interpreter: the tiled one TPUs (and CPU) run, whose dk/dv grid
  walks the group's 8 query heads and the query blocks, and the looped one Triton runs."""
  q, k, v, ct, segs = make_inputs(seq=72, groups=8, kv_heads=2, seed=8)
  kw = dict(segment_ids=segs, sliding_window=40)
  flash = functools.partial(fa.flash_attention, block_q=16, block_k=32, interpret=True,
                            backend=backend)
  ours, ref = jax.jit(lambda *a: (value_and_grads(flash, *a, **kw),
                                  value_and_grads(reference, *a, **kw)))(q, k, v, ct)
  assert_close(ours, ref, 2e-5)


@pytest.mark.parametrize("impl", ["pallas", "jax"])
def test_rows_with_no_visible_key_give_zeros(impl):
  """Queries whose segment has no keys (q and kv segment ids differ) get zeros, finite grads.

  The public API cannot produce such rows (a token always sees itself), so this drives the core
  with query and key segment ids of its own.
  """
  q, k, v, ct, segs = make_inputs(seq=40, groups=2)
  q_segs = segs.at[:, 30:].set(99)  # no key has segment 99
  cfg, _ = fa._prepare(q, k, v, causal=True, segment_ids=segs, prefix_mask=None,
                       sliding_window=None, logit_softcap=None, scale=None, block_q=16,
                       block_k=16, impl=impl, interpret=True)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 8)] + [(0, 0)] * (x.ndim - 2))  # seq 40 -> 48
  heads_major = lambda x: jnp.swapaxes(pad(x), 1, 2)
  aux = (pad(q_segs)[:, :, None], pad(segs)[:, None, :])

  def core(q, k, v):
    out = fa._attention(cfg, heads_major(q), heads_major(k), heads_major(v), aux)
    return jnp.swapaxes(out, 1, 2)[:, :40]

  @jax.jit
  def both(q, k, v, ct):
    return (value_and_grads(core, q, k, v, ct),
            value_and_grads(reference_attention, q, k, v, ct, q_segment_ids=q_segs,
                            kv_segment_ids=segs))

  ours, ref = both(q, k, v, ct)
  assert float(jnp.max(jnp.abs(ours[0][:, 30:]))) == 0.0
  assert float(jnp.max(jnp.abs(ours[1][0][:, 30:]))) == 0.0  # dq of the empty rows
  chex.assert_tree_all_finite(ours)
  assert_close(ours, ref, 2e-5)


def _visited_blocks(cfg, num_q, num_k):
  """Boolean [num_q, num_k] maps of the blocks the kv loop and the q loop visit."""
  by_q, by_k = np.zeros((num_q, num_k), bool), np.zeros((num_q, num_k), bool)
  for i in range(num_q):
    lo, hi = (int(x) for x in fa._kv_block_range(i, cfg))
    by_q[i, lo:hi] = True
  for j in range(num_k):
    lo, hi = (int(x) for x in fa._q_block_range(j, cfg, num_q))
    by_k[lo:hi, j] = True
  return by_q, by_k


@pytest.mark.parametrize("causal,prefix", [(True, False), (False, False), (True, True)])
def test_block_ranges_skip_only_invisible_blocks(causal, prefix):
  """Blocks outside the loop bounds are fully masked; without a prefix the bounds are tight."""
  seq = 100
  prefix_keys = (np.arange(seq) % 7 == 3)[None] if prefix else None
  for window in (None, 1, 2, 3, 7, 10, 17, 18, 23, 34):  # every alignment mod 8 and 16
    mask = np.asarray(explicit_mask(seq, causal=causal, window=window, prefix=prefix_keys))[0]
    for bq, bk in ((16, 8), (8, 16), (16, 16)):
      cfg = fa._Config(causal=causal, window=window, softcap=None, scale=1.0, block_q=bq,
                       block_k=bk, seq_len=seq, groups=1, segments=False, prefix=prefix,
                       impl="jax", interpret=True, backend="cpu")
      num_q, num_k = -(-seq // bq), -(-seq // bk)
      visible = np.array([[mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any()
                           for j in range(num_k)] for i in range(num_q)])
      for visited in _visited_blocks(cfg, num_q, num_k):
        assert not (visible & ~visited).any(), (window, bq, bk)
        if not prefix:
          np.testing.assert_array_equal(visited, visible, err_msg=f"{window} {bq} {bk}")


def _largest_intermediate(jaxpr) -> int:
  """Most elements of any value in a jaxpr, looking inside loops and Pallas kernels."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          largest = max(largest, _largest_intermediate(inner))
  return largest


@pytest.mark.parametrize("fn", [fa.flash_attention, fa.blockwise_attention_jax])
def test_no_seq_by_seq_intermediate(fn):
  seq = 256
  q, k, v, ct, segs = make_inputs(seq=seq, groups=2)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids=segs, block_q=32, block_k=32) * ct)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  assert _largest_intermediate(jaxpr) < seq * seq // 4
  ref_loss = lambda q, k, v: jnp.sum(reference(q, k, v, segment_ids=segs) * ct)
  assert _largest_intermediate(jax.make_jaxpr(jax.grad(ref_loss))(q, k, v).jaxpr) >= seq * seq


def test_bad_inputs_raise_clear_errors():
  q, k, v, _, segs = make_inputs(seq=16, groups=2)
  with pytest.raises(ValueError, match="head dims do not match"):
    fa.flash_attention(q, k[..., :8], v[..., :8])
  q3 = jnp.concatenate([q, q[:, :, :1]], axis=2)  # 3 query heads over 1 kv head is fine
  fa.blockwise_attention_jax(q3, k, v)
  with pytest.raises(ValueError, match="does not divide num_heads=3"):
    fa.flash_attention(q3, jnp.concatenate([k, k], 2), jnp.concatenate([v, v], 2))
  with pytest.raises(ValueError, match="same \\[batch, seq\\]"):
    fa.flash_attention(q, k[:, :8], v[:, :8])
  with pytest.raises(ValueError, match="segment_ids must be \\[batch, seq\\]"):
    fa.flash_attention(q, k, v, segment_ids=segs[:, :8])
  with pytest.raises(ValueError, match="prefix_mask must be"):
    fa.blockwise_attention_jax(q, k, v, prefix_mask=segs[0])
  with pytest.raises(ValueError, match="sliding_window must be a positive int"):
    fa.flash_attention(q, k, v, sliding_window=0)
  with pytest.raises(ValueError, match="logit_softcap must be a positive"):
    fa.flash_attention(q, k, v, logit_softcap=-1.0)
  with pytest.raises(ValueError, match="block_k must be a positive int"):
    fa.flash_attention(q, k, v, block_k=0)
  with pytest.raises(ValueError, match="rank 4"):
    fa.flash_attention(q[0], k[0], v[0])


def test_default_block_sizes_and_can_lower():
  assert fa.default_block_sizes("gpu", 8192, 64) == (128, 64)
  assert fa.default_block_sizes("gpu", 8192, 128) == (64, 64)
  assert fa.default_block_sizes("tpu", 8192, 128) == (256, 512)
  assert fa.default_block_sizes("cpu", 100, 64) == (128, 128)  # capped to the sequence
  assert fa.default_block_sizes("gpu", 3, 64) == (16, 16)  # Triton's smallest block
  for backend in ("cpu", "gpu", "tpu"):
    block_q, block_k = fa.default_block_sizes(backend, 4096, 64)
    assert block_q & (block_q - 1) == 0 and block_k & (block_k - 1) == 0
  # TPU blocks fit the chip's VMEM: defaults shrink where they would not, whatever the sequence
  assert fa.default_block_sizes("tpu", 8192, 1024, device_kind="TPU v5") == (256, 256)
  assert fa.default_block_sizes("tpu", 8192, 1024, device_kind="TPU v6 lite") == (256, 512)
  v4 = fa.vmem_limit_bytes("TPU v4")
  assert fa.vmem_bytes(256, 512, 128) <= v4 < fa.vmem_bytes(1024, 1024, 128)
  assert fa.can_lower("gpu") and fa.can_lower("tpu") and not fa.can_lower("cpu")
  assert fa.can_lower() == (jax.default_backend() != "cpu")
  with pytest.raises(ValueError, match="unknown backend 'metal'"):
    fa.default_block_sizes("metal", 128, 64)
  assert fa.reference_attention is reference_attention


def test_pallas_kernels_lower_to_triton_for_cuda(monkeypatch):
  """Cross-platform lowering (no GPU needed): the three kernels lower to Triton IR for CUDA.

  This catches what Triton rejects at trace time (block shapes, unsupported primitives); the
  Triton-to-PTX compile itself only runs on a GPU.
  """
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # picks the Triton parameters
  q = jax.ShapeDtypeStruct((1, 200, 4, 64), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 200, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 200), jnp.int32)

  def loss(q, k, v, ids):
    out = fa.flash_attention(q, k, v, segment_ids=ids, prefix_mask=ids, sliding_window=64,
                             logit_softcap=30.0, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  with abstract_gpu_mesh():
    text = grads.trace(q, kv, kv, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3  # fwd, dq, dk/dv
  with pytest.raises(ValueError, match="power-of-two block_q"):
    fa.flash_attention(jnp.zeros((1, 40, 2, 16)), *[jnp.zeros((1, 40, 1, 16))] * 2, block_q=24,
                       interpret=False)
