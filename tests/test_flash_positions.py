"""Flash attention with explicit token positions (context parallelism): a device's zigzag chunks
of queries against the all-gathered keys, in zigzag order, masked by the tokens' global indices.
The Pallas kernels (interpret mode) and the pure-JAX path against the reference, forward and
gradients; natural positions against no positions; the tiled kernels' skip of wholly invisible
tiles; bad inputs; and the Mosaic lowering for a TPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention as fa
from pallas_kernels.reference import attention_mask, reference_attention

SEQ, DEVICES, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 4, 2, 16
CHUNK = SEQ // (2 * DEVICES)


def zigzag(device: int) -> np.ndarray:
  """Global indices of a device's tokens: natural chunks `device` and 2C - 1 - device."""
  return np.concatenate([np.arange(c * CHUNK, (c + 1) * CHUNK)
                         for c in (device, 2 * DEVICES - 1 - device)])


KV_ORDER = np.concatenate([zigzag(d) for d in range(DEVICES)])  # the all-gathered keys' order


def inputs(batch=2, seed=0):
  """Natural-order q, k, v [b, SEQ, ...], a cotangent like q, segment ids and a prefix mask."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  cuts = [np.sort(rng.choice(np.arange(1, SEQ), size=3, replace=False)) for _ in range(batch)]
  segs = np.stack([np.searchsorted(c, np.arange(SEQ), side="right") for c in cuts])
  prefix = np.zeros((batch, SEQ), bool)
  prefix[:, :6] = True
  prefix[:, 37] = True  # a prefix key ahead of most queries of its segment
  return (normal(batch, SEQ, HEADS, HEAD_DIM), normal(batch, SEQ, KV_HEADS, HEAD_DIM),
          normal(batch, SEQ, KV_HEADS, HEAD_DIM), normal(batch, SEQ, HEADS, HEAD_DIM),
          segs, prefix)


def shard(device, q, k, v, ct, segs, prefix, *, use_prefix):
  """The device's queries (and cotangent), the zigzag keys, and the keyword arguments."""
  local, batch = zigzag(device), q.shape[0]
  tile = lambda idx: jnp.asarray(np.tile(idx, (batch, 1)), jnp.int32)
  kw = dict(segment_ids=jnp.asarray(segs[:, local]), kv_segment_ids=jnp.asarray(segs[:, KV_ORDER]),
            q_positions=tile(local), kv_positions=tile(KV_ORDER),
            prefix_mask=jnp.asarray(prefix[:, KV_ORDER]) if use_prefix else None)
  return q[:, local], k[:, KV_ORDER], v[:, KV_ORDER], ct[:, local], kw


def reference(q, k, v, *, segment_ids=None, kv_segment_ids=None, **kw):
  return reference_attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                             **kw)


def value_and_grads(fn, q, k, v, ct, **kw):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * ct)
  return fn(q, k, v, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@functools.partial(jax.jit, static_argnames=("window", "blocks"))
def three_impls(q, k, v, ct, kw, *, window, blocks):
  kw = dict(kw, sliding_window=window)
  block = dict(block_q=blocks[0], block_k=blocks[1])
  return (value_and_grads(functools.partial(fa.flash_attention, interpret=True), q, k, v, ct,
                          **kw, **block),
          value_and_grads(fa.blockwise_attention_jax, q, k, v, ct, **kw, **block),
          value_and_grads(reference, q, k, v, ct, **kw))


def assert_close(actual, expected, tol):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    scale = max(1.0, float(jnp.max(jnp.abs(e))))
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("device,window,use_prefix,blocks", [
    (1, 20, False, (8, 16)),  # GQA + packed segments + sliding window; q blocks inside chunks
    (0, None, True, (16, 16)),  # GQA + packed segments + a bidirectional prefix
])
def test_zigzag_shard_matches_reference(device, window, use_prefix, blocks):
  q, k, v, ct, segs, prefix = inputs(seed=device)
  ql, kz, vz, ctl, kw = shard(device, q, k, v, ct, segs, prefix, use_prefix=use_prefix)
  assert ql.shape[1] == 2 * CHUNK and kz.shape[1] == SEQ  # queries shorter than keys
  flash, blockwise, ref = three_impls(ql, kz, vz, ctl, kw, window=window, blocks=blocks)
  assert_close(flash, ref, 2e-5)
  assert_close(blockwise, ref, 2e-5)
  # The positions reference itself: the device's rows of natural-order attention over the whole
  # sequence (no positions, no permutation), so the zigzag mask is the causal one.
  natural = reference(q, k, v, segment_ids=segs, kv_segment_ids=segs, sliding_window=window,
                      prefix_mask=jnp.asarray(prefix) if use_prefix else None)
  assert_close(ref[0], natural[:, zigzag(device)], 1e-5)
  assert float(jnp.max(jnp.abs(ref[1][1]))) > 0  # the keys get gradients


@pytest.mark.parametrize("impl", ["flash", "jax"])
def test_natural_positions_equal_no_positions(impl):
  """Positions that are the array's own iota (40 tokens: padded blocks) change nothing."""
  q, k, v, ct, segs, _ = inputs(batch=1, seed=3)
  q, k, v, ct, segs = q[:, :40], k[:, :40], v[:, :40], ct[:, :40], jnp.asarray(segs[:, :40])
  fn = (functools.partial(fa.flash_attention, interpret=True) if impl == "flash"
        else fa.blockwise_attention_jax)
  pos = jnp.arange(40, dtype=jnp.int32)[None]
  kw = dict(segment_ids=segs, sliding_window=13, block_q=16, block_k=8)

  @jax.jit
  def both(q, k, v, ct):
    return (value_and_grads(fn, q, k, v, ct, **kw),
            value_and_grads(fn, q, k, v, ct, q_positions=pos, kv_positions=pos, **kw))

  plain, positioned = both(q, k, v, ct)
  assert_close(positioned, plain, 1e-6)


def test_tiled_kernels_skip_wholly_invisible_tiles(monkeypatch):
  """NaN keys and values in a chunk that no query of the shard can see (causal for chunk 0, the
  window for chunk 3): the tiled forward, dq and dk/dv kernels skip those tiles, so no NaN gets
  in (a masked tile would still compute 0 * NaN). Without the skip the NaN does get in."""
  q, k, v, ct, segs, prefix = inputs(batch=1, seed=5)
  ql, kz, vz, ctl, kw = shard(0, q, k, v, ct, segs, prefix, use_prefix=False)  # chunks 0 and 3
  hidden = jnp.asarray((KV_ORDER >= CHUNK) & (KV_ORDER < 2 * CHUNK))[None, :, None, None]
  poison = lambda x: jnp.where(hidden, jnp.nan, x)
  kw.update(sliding_window=CHUNK)
  flash = functools.partial(fa.flash_attention, interpret=True, block_q=CHUNK, block_k=CHUNK)
  out, (dq, dk, dv) = value_and_grads(flash, ql, poison(kz), poison(vz), ctl, **kw)
  ref, ref_grads = value_and_grads(reference, ql, kz, vz, ctl, **kw)
  assert_close((out, dq), (ref, ref_grads[0]), 2e-5)
  visible = ~np.asarray(hidden)[0, :, 0, 0]
  assert_close((dk[:, visible], dv[:, visible]), (ref_grads[1][:, visible],
                                                   ref_grads[2][:, visible]), 2e-5)
  assert not np.asarray(dk[:, ~visible]).any() and not np.asarray(dv[:, ~visible]).any()
  # The control: with every tile judged visible, the masked NaN tiles poison the result.
  monkeypatch.setattr(fa, "_tile_visible", lambda cfg, q_pos, k_pos: True)
  out = flash(ql, poison(kz), poison(vz), **kw)
  assert np.isnan(np.asarray(out)).any()


def test_tile_visibility_bounds():
  """`_tile_visible` on zigzag tiles equals 'some pair passes causal and window' when a tile's
  positions are contiguous, and is never False for a visible tile when they are not."""
  cfg = lambda window: fa._Config(
      causal=True, window=window, softcap=None, scale=1.0, block_q=CHUNK, block_k=CHUNK,
      seq_len=2 * CHUNK, groups=1, segments=False, prefix=False, impl="pallas", interpret=True,
      backend="cpu", kv_len=SEQ, positions=True)
  rng = np.random.default_rng(0)
  for window in (None, 1, CHUNK, CHUNK + 1, 3 * CHUNK):
    for block in (CHUNK, 2 * CHUNK):  # one chunk a tile (tight), or two chunks (conservative)
      q_pos, k_pos = zigzag(0), rng.permutation(KV_ORDER) if block > CHUNK else KV_ORDER
      for i in range(0, len(q_pos), CHUNK):
        for j in range(0, SEQ, block):
          qp, kp = q_pos[i:i + CHUNK, None], k_pos[None, j:j + block]
          ok = (kp <= qp) & ((qp - kp < window) if window else True)
          got = bool(fa._tile_visible(cfg(window), jnp.asarray(qp), jnp.asarray(kp)))
          assert got or not ok.any(), (window, i, j)
          if block == CHUNK:
            assert got == ok.any(), (window, i, j)
  # Edges: a single visible pair at the tile's corner keeps it; one step further drops it.
  tile = lambda lo, n, shape: jnp.arange(lo, lo + n, dtype=jnp.int32).reshape(shape)
  visible = lambda window, q0, k0: bool(fa._tile_visible(
      cfg(window), tile(q0, CHUNK, (CHUNK, 1)), tile(k0, CHUNK, (1, CHUNK))))
  assert visible(None, 0, CHUNK - 1) and not visible(None, 0, CHUNK)  # causal: k <= q
  assert visible(2, 2 * CHUNK, CHUNK) and not visible(2, 2 * CHUNK, CHUNK - 1)  # q - k < 2


def test_bad_position_inputs_raise_clear_errors():
  q, k, v, *_ = inputs(batch=1)
  pos = jnp.arange(SEQ, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match="both q_positions and kv_positions"):
    fa.flash_attention(q, k, v, q_positions=pos)
  with pytest.raises(ValueError, match="both q_positions and kv_positions"):
    attention_mask(4, 4, causal=True, q_segment_ids=None, kv_segment_ids=None,
                   kv_positions=pos[:, :4])
  with pytest.raises(ValueError, match="same \\[batch, seq\\]"):  # unequal lengths need positions
    fa.flash_attention(q[:, :32], k, v)
  with pytest.raises(ValueError, match="q_positions must be \\[batch, q_len\\]"):
    fa.blockwise_attention_jax(q[:, :32], k, v, q_positions=pos, kv_positions=pos)
  with pytest.raises(ValueError, match="pass kv_segment_ids"):
    fa.blockwise_attention_jax(q[:, :32], k, v, q_positions=pos[:, :32], kv_positions=pos,
                               segment_ids=pos[:, :32])
  with pytest.raises(ValueError, match="prefix_mask must be \\[batch, kv_len\\]"):
    fa.blockwise_attention_jax(q[:, :32], k, v, q_positions=pos[:, :32], kv_positions=pos,
                               prefix_mask=pos[:, :32])
  with pytest.raises(ValueError, match="kv_segment_ids needs segment_ids"):
    fa.flash_attention(q, k, v, kv_segment_ids=pos)


def test_positions_compile_for_tpu_with_mosaic():
  """The TPU compiler (libtpu, no TPU needed) compiles the forward, dq and dk/dv kernels with
  positions, a window and segments at 128-blocks: Mosaic accepts the tile-visibility reductions."""
  from pretrainx import topology
  from pretrainx.plan import mosaic_kernel_count
  if not topology.libtpu_available():
    pytest.skip("needs libtpu (the TPU compiler)")
  P = jax.sharding.PartitionSpec
  mesh = jax.sharding.Mesh(topology.load("v5p-8").devices[:1], ("x",))
  one = jax.sharding.NamedSharding(mesh, P())
  q_len, kv_len, d = 256, 512, 128
  shapes = [((1, q_len, HEADS, d), jnp.bfloat16), ((1, kv_len, KV_HEADS, d), jnp.bfloat16),
            ((1, kv_len, KV_HEADS, d), jnp.bfloat16), ((1, q_len), jnp.int32),
            ((1, kv_len), jnp.int32), ((1, q_len), jnp.int32), ((1, kv_len), jnp.int32)]
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=one) for shape, dtype in shapes]

  def attend(q, k, v, q_seg, k_seg, q_pos, k_pos):
    return fa.flash_attention(q, k, v, segment_ids=q_seg, kv_segment_ids=k_seg,
                              q_positions=q_pos, kv_positions=k_pos, sliding_window=200,
                              block_q=128, block_k=128, interpret=False, backend="tpu")

  def loss(*args):
    out = jax.shard_map(attend, mesh=mesh, in_specs=(P(),) * 7, out_specs=P(),
                        check_vma=False)(*args)
    return jnp.sum(out.astype(jnp.float32))

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  assert mosaic_kernel_count(compiled) == 3  # forward, dq, dk/dv
