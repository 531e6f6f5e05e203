"""Flash attention: blockwise online-softmax attention as Pallas kernels (forward and backward),
plus `blockwise_attention_jax`, the same algorithm in pure JAX (a jitted CPU fallback and the
path the CPU benchmark measures). `reference_attention` is the ground truth both are tested against.

Semantics follow `pallas_kernels.reference`: q [batch, seq, heads, head_dim], k/v [batch, seq,
kv_heads, head_dim] (GQA: query head h reads kv head h // groups, never a repeated copy),
mask(i, j) = same_segment & (causal_ok | prefix[j]) & (i - j < window), soft-cap before masking,
fully masked rows give zeros. Scores, softmax statistics and accumulators are fp32.

Inside: heads-major [batch, heads, seq_pad, head_dim], seq padded to a multiple of both blocks
(padded keys masked by position). Two layouts of the same kernels. The tiled one (Mosaic on TPU,
and the CPU interpreter) holds one (query block, key block) tile in VMEM at a time: the forward
and dq grids are (batch, heads, q_blocks, k_blocks), the dk/dv grid (batch, kv_heads, k_blocks,
groups, q_blocks); the trailing dimensions accumulate in fp32 VMEM scratch, steps outside the
causal/window bounds compute nothing and fetch no new block. So VMEM depends on the blocks only,
never on the sequence or the GQA group, and TPU block sizes are chosen to fit the chip's VMEM
(`vmem_bytes`, `default_block_sizes`). The looped one (Triton on GPU, whose grid programs run in
parallel) loops over the visible blocks inside each program: forward and dq on (batch, heads,
q_blocks), dk/dv on (batch, kv_heads, k_blocks) over the group's query heads, so dk/dv are summed
over the group inside the kernel.

Explicit positions (context parallelism: a zigzag shard of queries against all-gathered keys):
q [b, q_len, ...] and k/v [b, kv_len, ...] pad separately (q_pad, kv_pad), and token positions
travel as aux arrays like the segment ids (q_pos [b, q_pad, 1], k_pos [b, 1, kv_pad]); the mask
compares them instead of the indices. The static block ranges assume natural order, so they
become the full range; the tiled kernels still skip the compute of a tile that no pair can see,
judged from the min / max of its positions (`_tile_visible`), though its blocks are fetched. The
looped kernels and the pure-JAX path visit every block and mask it.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.reference import MASK_VALUE, check_attention_shapes, reference_attention

__all__ = ["flash_attention", "blockwise_attention_jax", "reference_attention",
           "default_block_sizes", "can_lower", "vmem_bytes", "vmem_limit_bytes", "tpu_device_kind"]

_BACKENDS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
# (block_q, block_k) for head_dim <= 64 and for larger heads; smallest block per backend
# (Triton needs powers of two >= 16; Mosaic wants multiples of 128 on the lane axis).
_DEFAULT_BLOCKS = {"cpu": ((256, 256), (256, 256)), "gpu": ((128, 64), (64, 64)),
                   "tpu": ((512, 512), (256, 512))}
_MIN_BLOCK = {"cpu": 8, "gpu": 16, "tpu": 128}


class _Config(NamedTuple):
  """Static (hashable) description of one attention call."""
  causal: bool
  window: int | None
  softcap: float | None
  scale: float
  block_q: int
  block_k: int
  seq_len: int  # real query length; arrays are padded beyond it
  groups: int  # query heads per kv head
  segments: bool
  prefix: bool
  impl: str  # 'pallas' or 'jax'
  interpret: bool
  backend: str  # 'cpu', 'gpu' or 'tpu': picks the Pallas compiler
  kv_len: int | None = None  # real key length; None: seq_len (self-attention)
  positions: bool = False  # the mask compares explicit token positions (aux arrays)

  @property
  def k_len(self) -> int:
    return self.seq_len if self.kv_len is None else self.kv_len


# ----------------------------------------------------------------------------- block sizes


def _backend(backend: str | None) -> str:
  name = jax.default_backend() if backend is None else backend
  if name not in _BACKENDS:
    raise ValueError(f"unknown backend {name!r}; use one of 'cpu', 'gpu', 'tpu'.")
  return _BACKENDS[name]


def _cap_block(block: int, seq_len: int, backend: str) -> int:
  """A block no larger than the sequence rounded up to a power of two (and >= the minimum)."""
  return min(block, max(_MIN_BLOCK[backend], pl.next_power_of_2(seq_len)))


def default_block_sizes(backend: str, seq_len: int, head_dim: int, *,
                        device_kind: str | None = None, itemsize: int = 2) -> tuple[int, int]:
  """(block_q, block_k) for `backend` ('cpu', 'gpu', 'tpu'), capped to the sequence; on TPU
  shrunk until the kernels fit the VMEM of `device_kind` (None: the smallest, v4's and v5e's)."""
  backend = _backend(backend)
  block_q, block_k = _DEFAULT_BLOCKS[backend][0 if head_dim <= 64 else 1]
  blocks = _cap_block(block_q, seq_len, backend), _cap_block(block_k, seq_len, backend)
  if backend == "tpu":
    blocks = _shrink_to_fit(blocks, head_dim, itemsize, vmem_limit_bytes(device_kind)) or (
        _MIN_BLOCK["tpu"],) * 2
  return blocks


# VMEM one Mosaic kernel may use, per TensorCore, by the device kind libtpu reports. Physical
# VMEM, from jax's chip table (jax/_src/pallas/mosaic/tpu_info.py): 16 MiB on v4, 128 MiB on v5e,
# 64 MiB on v5p, 128 MiB on v6e. What a kernel gets by default was measured with libtpu 0.0.42.1
# by compiling oversized kernels for each generation, whose errors name the limit: a kernel's own
# allocations (scratch, temporaries) stop at a scoped 16 MiB on v4, v5e and v5p ('Scoped
# allocation with size 25.93M and limit 16.00M' on v5p; v5e's block windows count too), while
# v6e compiled a kernel needing ~52 MiB. (--xla_tpu_scoped_vmem_limit_kib raises the scoped limit.)
_TPU_VMEM_MIB = {"TPU v4": 16, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 16, "TPU v5p": 16,
                 "TPU v6 lite": 96, "TPU v6e": 96}  # v6e: 3/4 of its 128 MiB
_CHIP_NAMES = {"TPU v5": "TPU v5p", "TPU v5 lite": "TPU v5e", "TPU v6 lite": "TPU v6e",
               None: "an unknown TPU"}


def tpu_device_kind() -> str | None:
  """The TPU kind being compiled for ('TPU v5', ...): the current mesh's devices (a TPU topology
  when compiling ahead of time from a CPU host), else the default backend's; None if no TPU."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  kind = getattr(device, "device_kind", None)
  if kind is None and jax.default_backend() == "tpu":
    kind = jax.devices()[0].device_kind
  return kind if kind is None or kind.startswith("TPU") else None


def vmem_limit_bytes(device_kind: str | None) -> int:
  """A Mosaic kernel's VMEM limit on `device_kind`; unknown kinds get the smallest (v4, v5e)."""
  return _TPU_VMEM_MIB.get(device_kind, min(_TPU_VMEM_MIB.values())) * 2**20


def _tile_bytes(rows: int, cols: int, itemsize: int = 4) -> int:
  """VMEM of a [rows, cols] block: padded to (8 * 4 / itemsize, 128) tiles."""
  sublanes = 8 * 4 // itemsize
  return -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def vmem_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int = 2) -> int:
  """Estimated VMEM of the largest tiled kernel (forward, dq, dk/dv) at these blocks: in and out
  blocks double-buffered, fp32 scratch, and 4 live [block_q, block_k] fp32 temporaries (the TPU
  compiler used ~3.2 in the forward at 2048 x 1024). It does not grow with the sequence or the
  GQA group (both are grid dimensions)."""
  q, kv = _tile_bytes(block_q, head_dim, itemsize), _tile_bytes(block_k, head_dim, itemsize)
  rows, cols = _tile_bytes(block_q, 1), _tile_bytes(1, block_k)
  scores = _tile_bytes(block_q, block_k)
  aux = 2 * (rows + 2 * cols)  # segment ids and prefix, if any
  forward = 2 * (2 * q + 2 * kv + rows) + 2 * rows + _tile_bytes(block_q, head_dim)
  dq = 2 * (3 * q + 2 * kv + 2 * rows) + _tile_bytes(block_q, head_dim)
  dkdv = 2 * (2 * q + 4 * kv + 2 * rows) + 2 * _tile_bytes(block_k, head_dim)
  return aux + max(forward, dq, dkdv) + 4 * scores


def _fits(blocks, head_dim: int, itemsize: int, limit: int) -> bool:
  return vmem_bytes(*blocks, head_dim, itemsize) <= limit


def _shrink_to_fit(blocks, head_dim: int, itemsize: int, limit: int):
  """Halves the larger block (multiples of 128) until the blocks fit; None if 128 x 128 does not."""
  block_q, block_k = blocks
  while not _fits((block_q, block_k), head_dim, itemsize, limit):
    if max(block_q, block_k) <= 128:
      return None
    if block_q > block_k:
      block_q = max(128, block_q // 2 // 128 * 128)
    else:
      block_k = max(128, block_k // 2 // 128 * 128)
  return block_q, block_k


def _check_vmem(block_q: int, block_k: int, head_dim: int, itemsize: int,
                device_kind: str | None) -> None:
  """A ValueError naming the nearest blocks that fit when these cannot fit the chip's VMEM."""
  limit = vmem_limit_bytes(device_kind)
  if _fits((block_q, block_k), head_dim, itemsize, limit):
    return
  fit = _shrink_to_fit((block_q, block_k), head_dim, itemsize, limit)
  nearest = ("no block size fits: use attention_impl='reference'" if fit is None else
             f"the nearest sizes that fit are block_q={fit[0]}, block_k={fit[1]}")
  raise ValueError(
      f"flash block_q={block_q}, block_k={block_k} need about "
      f"{vmem_bytes(block_q, block_k, head_dim, itemsize) / 2**20:.0f} MiB of VMEM at head_dim "
      f"{head_dim}, more than a kernel gets on {_CHIP_NAMES.get(device_kind, device_kind)} "
      f"({limit // 2**20} MiB); {nearest}.")


def _nearest(value: int, multiple: int) -> str:
  """'128' or '128 or 256': the multiples of `multiple` nearest to value (at least one)."""
  low = max(value // multiple * multiple, multiple)
  high = -(-value // multiple) * multiple
  return str(low) if low >= high else f"{low} or {high}"


def can_lower(backend: str | None = None) -> bool:
  """Whether the Pallas kernel is expected to compile natively (cpu: interpret mode only)."""
  return _backend(backend) in ("gpu", "tpu")


# ----------------------------------------------------------------------------- shared block math


def _kv_block_range(q_block, cfg: _Config):
  """Key blocks [lo, hi) that queries of q block `q_block` can see (all of them with explicit
  positions, whose order these static bounds cannot know: see `_tile_visible`)."""
  num_k = pl.cdiv(cfg.k_len, cfg.block_k)  # blocks wholly in the padding are never visited
  first_q = q_block * cfg.block_q
  lo, hi = 0, num_k
  if cfg.positions:
    return lo, hi
  if cfg.window is not None:  # key j is visible to query i only if j > i - window
    lo = jnp.maximum(first_q - cfg.window + 1, 0) // cfg.block_k
  if cfg.causal and not cfg.prefix:  # keys after the block's last query are hidden
    hi = jnp.minimum((first_q + cfg.block_q - 1) // cfg.block_k + 1, num_k)
  return lo, hi


def _q_block_range(k_block, cfg: _Config, num_q: int):
  """Query blocks [lo, hi) that can see some key of k block `k_block` (all with positions)."""
  first_k = k_block * cfg.block_k
  lo, hi = 0, num_q
  if cfg.positions:
    return lo, hi
  if cfg.causal and not cfg.prefix:
    lo = first_k // cfg.block_q
  if cfg.window is not None:  # the last key of the block is seen up to query last_k + window - 1
    hi = jnp.minimum((first_k + cfg.block_k + cfg.window - 2) // cfg.block_q + 1, num_q)
  return lo, hi


def _mask(cfg: _Config, q_idx, k_idx, q_seg=None, k_seg=None, prefix=None, q_pos=None,
          k_pos=None):
  """Visibility by broadcasting q_idx [..., bq, 1] against k_idx [..., 1, bk] (array indices);
  None if all visible.

  q_seg, q_pos [..., bq, 1] and k_seg, prefix, k_pos [..., 1, bk] are int arrays (used when cfg
  says so); with cfg.positions the causal mask and the window compare q_pos and k_pos instead of
  the indices, while padded keys stay masked by index.
  """
  conds = []
  if cfg.k_len % cfg.block_k:  # the last visited key block holds padding
    conds.append(k_idx < cfg.k_len)
  if not cfg.positions:
    q_pos, k_pos = q_idx, k_idx
  if cfg.causal:
    conds.append(k_pos <= q_pos if not cfg.prefix else (k_pos <= q_pos) | (prefix != 0))
  if cfg.window is not None:
    conds.append(q_pos - k_pos < cfg.window)
  if cfg.segments:
    conds.append(q_seg == k_seg)
  return functools.reduce(jnp.logical_and, conds) if conds else None


def _tile_visible(cfg: _Config, q_pos, k_pos):
  """Whether some pair of a tile with positions q_pos [bq, 1] and k_pos [1, bk] can pass the
  causal and window conditions (segments aside): the block skip for explicit positions, which
  `_kv_block_range` cannot give. True when cfg.positions is off or nothing can be ruled out.
  Padded positions only widen it. The min/max are taken in fp32 (exact below 2**24), which
  Mosaic reduces like any float vector."""
  visible = True
  if not cfg.positions:
    return visible
  q_pos, k_pos = q_pos.astype(jnp.float32), k_pos.astype(jnp.float32)
  if cfg.causal and not cfg.prefix:  # some key at or before some query
    visible = jnp.min(k_pos) <= jnp.max(q_pos)
  if cfg.window is not None:  # some pair closer than the window
    visible = visible & (jnp.min(q_pos) - jnp.max(k_pos) < cfg.window)
  return visible


def _softcap(scores, cfg: _Config):
  """scale-d raw scores [..., bq, bk] fp32 -> (capped scores, d capped / d raw or None)."""
  scores = scores * cfg.scale
  if cfg.softcap is None:
    return scores, None
  t = jnp.tanh(scores / cfg.softcap)
  return cfg.softcap * t, 1.0 - t * t


def _online_update(carry, s, mask, pv):
  """One key block of online softmax; carry (m, l [..., bq, 1], acc [..., bq, d]), pv(p) = p @ v."""
  m, l, acc = carry
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)  # fully masked rows keep l = 0 instead of averaging
  return m_new, alpha * l + jnp.sum(p, axis=-1, keepdims=True), alpha * acc + pv(p)


def _finish(m, l, acc):
  """(out fp32 [..., bq, d], logsumexp [..., bq, 1]); rows that saw no key give zeros."""
  l_safe = jnp.where(l == 0.0, 1.0, l)
  return acc / l_safe, m + jnp.log(l_safe)


def _probs_and_dscores(s, dcap, mask, lse, delta, dp):
  """Recomputed probabilities p and d loss / d raw scores (before scale), all [..., bq, bk]."""
  p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  ds = p * (dp - delta)
  return p, ds if dcap is None else ds * dcap


# ----------------------------------------------------------------------------- Pallas kernels


def _split_aux(cfg: _Config, refs):
  """refs = (*aux, *rest) -> (_Aux of refs or None, rest)."""
  n = 2 * cfg.segments + cfg.prefix + 2 * cfg.positions
  return _Aux.of(cfg, refs[:n]), refs[n:]


class _Aux(NamedTuple):
  """The int aux arrays (or refs, or slices) of a call; None where cfg has no such array.
  q_seg, q_pos are keyed like the queries ([..., rows, 1]), the rest like the keys."""
  q_seg: object = None
  k_seg: object = None
  prefix: object = None
  q_pos: object = None
  k_pos: object = None

  @staticmethod
  def of(cfg: _Config, present) -> "_Aux":
    """From the arrays present, in the order `_present_aux` lists them."""
    present = list(present)
    take = lambda flag: present.pop(0) if flag else None
    q_seg, k_seg = take(cfg.segments), take(cfg.segments)
    prefix = take(cfg.prefix)
    return _Aux(q_seg, k_seg, prefix, take(cfg.positions), take(cfg.positions))


def _read(ref, *idx):
  return None if ref is None else ref[idx]


def _dot_t(a, b):
  """a [m, d] @ b[n, d]^T -> [m, n] fp32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _key_block(cfg: _Config, k_ref, v_ref, aux: _Aux, k_block, q_idx, q_seg, q_pos):
  """(k [bk, d], v [bk, d], mask [bq, bk]) of key block `k_block` for the program's queries;
  aux holds the whole-sequence key-side refs. (With explicit positions every key block is
  visited and masked: the looped kernels do not skip by position.)"""
  start = pl.multiple_of(k_block * cfg.block_k, cfg.block_k)
  cols = pl.ds(start, cfg.block_k)
  k_idx = start + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
  key = lambda ref: _read(ref, slice(None), cols)
  mask = _mask(cfg, q_idx, k_idx, q_seg, key(aux.k_seg), key(aux.prefix), q_pos, key(aux.k_pos))
  return k_ref[cols, :], v_ref[cols, :], mask


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config):
  """Program (b, h, i): q [bq, d], k/v [kv_pad, d]; writes o [bq, d] and lse [bq, 1]."""
  aux, (o_ref, lse_ref) = _split_aux(cfg, refs)
  bq = cfg.block_q
  q_block = pl.program_id(2)
  q = q_ref[...]
  q_idx = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg, q_pos = (_read(r, slice(None), slice(None)) for r in (aux.q_seg, aux.q_pos))

  def body(k_block, carry):
    k, v, mask = _key_block(cfg, k_ref, v_ref, aux, k_block, q_idx, q_seg, q_pos)
    s, _ = _softcap(_dot_t(q, k), cfg)
    return _online_update(carry, s, mask, lambda p: _dot(p.astype(v.dtype), v))

  init = (jnp.full((bq, 1), MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, q.shape[-1]), jnp.float32))
  out, lse = _finish(*jax.lax.fori_loop(*_kv_block_range(q_block, cfg), body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  """Program (b, h, i): dq [bq, d] = scale * sum over visible key blocks of ds @ k."""
  aux, (dq_ref,) = _split_aux(cfg, refs)
  bq = cfg.block_q
  q_block = pl.program_id(2)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_idx = q_block * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg, q_pos = (_read(r, slice(None), slice(None)) for r in (aux.q_seg, aux.q_pos))

  def body(k_block, dq):
    k, v, mask = _key_block(cfg, k_ref, v_ref, aux, k_block, q_idx, q_seg, q_pos)
    s, dcap = _softcap(_dot_t(q, k), cfg)
    _, ds = _probs_and_dscores(s, dcap, mask, lse, delta, _dot_t(do, v))
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(*_kv_block_range(q_block, cfg), body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg: _Config):
  """Program (b, kv_head, j): q/do [groups, q_pad, d], k/v [bk, d]; dk, dv [bk, d]."""
  aux, (dk_ref, dv_ref) = _split_aux(cfg, refs)
  bq, bk = cfg.block_q, cfg.block_k
  k_block = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_idx = k_block * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  k_seg, prefix, k_pos = (_read(r, slice(None), slice(None))
                          for r in (aux.k_seg, aux.prefix, aux.k_pos))
  lo, hi = _q_block_range(k_block, cfg, pl.cdiv(cfg.seq_len, bq))
  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for g in range(cfg.groups):  # static: the query heads sharing this kv head

    def body(q_block, carry, g=g):
      dk, dv = carry
      start = pl.multiple_of(q_block * bq, bq)
      rows = pl.ds(start, bq)
      q, do = q_ref[g, rows, :], do_ref[g, rows, :]
      q_idx = start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      mask = _mask(cfg, q_idx, k_idx, _read(aux.q_seg, rows, slice(None)), k_seg, prefix,
                   _read(aux.q_pos, rows, slice(None)), k_pos)
      s, dcap = _softcap(_dot_t(q, k), cfg)
      p, ds = _probs_and_dscores(s, dcap, mask, lse_ref[g, rows, :], delta_ref[g, rows, :],
                                 _dot_t(do, v))
      return dk + _dot(ds.T.astype(q.dtype), q), dv + _dot(p.T.astype(do.dtype), do)

    carry = jax.lax.fori_loop(lo, hi, body, carry)
  dk_ref[...] = (carry[0] * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _aux_specs(cfg: _Config, q_pad: int, kv_pad: int, blocked: str) -> list[pl.BlockSpec]:
  """BlockSpecs of the aux arrays (q_seg, q_pos [b, q_pad, 1]; k_seg, prefix, k_pos [b, 1,
  kv_pad]) for a grid (b, head, block) blocked over queries (blocked='q') or keys ('k')."""
  bq = cfg.block_q if blocked == "q" else q_pad
  bk = cfg.block_k if blocked == "k" else kv_pad
  q_map = (lambda b, h, i: (b, i, 0)) if blocked == "q" else (lambda b, h, i: (b, 0, 0))
  k_map = (lambda b, h, i: (b, 0, i)) if blocked == "k" else (lambda b, h, i: (b, 0, 0))
  return _present_aux(cfg, pl.BlockSpec((None, bq, 1), q_map), pl.BlockSpec((None, 1, bk), k_map))


def _present_aux(cfg: _Config, q_like, k_like) -> list:
  """Of the aux arrays (q_seg, k_seg, prefix, q_pos, k_pos), those this call passes, each as
  q_like (keyed like the queries) or k_like (like the keys): the order `_Aux.of` reads."""
  return (([q_like, k_like] if cfg.segments else []) + ([k_like] if cfg.prefix else [])
          + ([q_like, k_like] if cfg.positions else []))


def _compiler_params(cfg: _Config, semantics=("parallel",) * 3):
  """Triton on GPU (jax's default there is Mosaic GPU, which wants other kernels), Mosaic on TPU."""
  if cfg.interpret or cfg.backend == "cpu":
    return None
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top
    return pl_triton.CompilerParams(num_warps=4, num_stages=2)
  from jax.experimental.pallas import tpu as pl_tpu  # pylint: disable=g-import-not-at-top
  return pl_tpu.CompilerParams(dimension_semantics=semantics)


def _query_grid_specs(cfg: _Config, kv_pad: int, head_dim: int):
  """Specs for a (b, head, q_block) grid: a q-like block, whole-sequence k/v of head // groups,
  and a [block_q, 1] row-statistics block."""
  g, bq = cfg.groups, cfg.block_q
  return (pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i: (b, h, i, 0)),
          pl.BlockSpec((None, None, kv_pad, head_dim), lambda b, h, i: (b, h // g, 0, 0)),
          pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)))


def _pallas_forward(cfg: _Config, q, k, v, aux):
  """q [b, h, q_pad, d], k/v [b, kvh, kv_pad, d] -> (out like q, lse [b, h, q_pad, 1])."""
  batch, heads, q_pad, head_dim = q.shape
  kv_pad = k.shape[2]
  q_spec, kv_spec, row_spec = _query_grid_specs(cfg, kv_pad, head_dim)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32)),
      grid=(batch, heads, q_pad // cfg.block_q),
      in_specs=[q_spec, kv_spec, kv_spec, *_aux_specs(cfg, q_pad, kv_pad, "q")],
      out_specs=(q_spec, row_spec), interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg), name="flash_attention_fwd",
  )(q, k, v, *aux)


def _pallas_backward(cfg: _Config, q, k, v, aux, lse, do, delta):
  """Gradients (dq, dk, dv) shaped like (q, k, v); delta = rowsum(do * out) [b, h, q_pad, 1]."""
  batch, heads, q_pad, head_dim = q.shape
  kv_pad = k.shape[2]
  q_spec, kv_spec, row_spec = _query_grid_specs(cfg, kv_pad, head_dim)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(batch, heads, q_pad // cfg.block_q),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *_aux_specs(cfg, q_pad, kv_pad, "q")],
      out_specs=q_spec, interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg), name="flash_attention_dq",
  )(q, k, v, do, lse, delta, *aux)
  # Grid (b, kv_head, k_block): the group's query heads are one block of `groups` heads.
  group_spec = pl.BlockSpec((None, cfg.groups, q_pad, head_dim), lambda b, h, j: (b, h, 0, 0))
  group_rows = pl.BlockSpec((None, cfg.groups, q_pad, 1), lambda b, h, j: (b, h, 0, 0))
  k_spec = pl.BlockSpec((None, None, cfg.block_k, head_dim), lambda b, h, j: (b, h, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg),
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      grid=(batch, k.shape[1], kv_pad // cfg.block_k),
      in_specs=[group_spec, k_spec, k_spec, group_spec, group_rows, group_rows,
                *_aux_specs(cfg, q_pad, kv_pad, "k")],
      out_specs=(k_spec, k_spec), interpret=cfg.interpret,
      compiler_params=_compiler_params(cfg), name="flash_attention_dkdv",
  )(q, k, v, do, lse, delta, *aux)
  return dq, dk, dv


# --------------------------------------------------------------------------- Pallas kernels: tiled


def _block_at(block, lo, hi):
  """The block an index map fetches at grid step `block`: clamped into the visible [lo, hi), so
  that a skipped step re-uses the block already in VMEM instead of copying a new one."""
  return jnp.minimum(jnp.maximum(block, lo), hi - 1)


def _tiled_fwd_kernel(q_ref, k_ref, v_ref, *refs, cfg: _Config):
  """Program (b, h, i, j): q [bq, d], k/v [bk, d]; over j it fills o [bq, d] and lse [bq, 1]."""
  aux, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split_aux(cfg, refs)
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_tile_computes(cfg, k_block, _kv_block_range(q_block, cfg), aux))
  def _():
    v, mask = v_ref[...], _tile_mask(cfg, q_block, k_block, aux)
    s, _ = _softcap(_dot_t(q_ref[...], k_ref[...]), cfg)
    m, l, acc = _online_update((m_ref[...], l_ref[...], acc_ref[...]), s, mask,
                               lambda p: _dot(p.astype(v.dtype), v))
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _():
    out, lse = _finish(m_ref[...], l_ref[...], acc_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tile_computes(cfg: _Config, block, lo_hi, aux: _Aux):
  """Whether a grid step computes its tile: its sequential `block` is inside the static range
  lo_hi and, with explicit positions (whose ranges are everything), the tile-sized position refs
  allow a visible pair. A skipped step computes nothing; without positions it also fetches no
  new block (the index maps clamp to the range), with positions its blocks are still fetched."""
  lo, hi = lo_hi
  in_range = (block >= lo) & (block < hi)
  if not cfg.positions:
    return in_range
  return in_range & _tile_visible(cfg, aux.q_pos[...], aux.k_pos[...])


def _tile_mask(cfg: _Config, q_block, k_block, aux: _Aux):
  """The [bq, bk] mask of one (query block, key block) tile whose aux refs are tile-sized."""
  q_idx = q_block * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
  k_idx = k_block * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
  whole = lambda ref: _read(ref, slice(None), slice(None))
  return _mask(cfg, q_idx, k_idx, *(whole(ref) for ref in aux))


def _tile_grads(cfg: _Config, refs, aux: _Aux, q_block, k_block):
  """(p, ds) [bq, bk] of one tile; refs = (q, k, v, do, lse, delta)."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs
  s, dcap = _softcap(_dot_t(q_ref[...], k_ref[...]), cfg)
  return _probs_and_dscores(s, dcap, _tile_mask(cfg, q_block, k_block, aux), lse_ref[...],
                            delta_ref[...], _dot_t(do_ref[...], v_ref[...]))


def _tiled_dq_kernel(*refs, cfg: _Config):
  """Program (b, h, i, j): over the visible key blocks j, dq [bq, d] = scale * sum ds @ k."""
  aux, (dq_ref, acc_ref) = _split_aux(cfg, refs[6:])
  q_block, k_block = pl.program_id(2), pl.program_id(3)

  @pl.when(k_block == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_tile_computes(cfg, k_block, _kv_block_range(q_block, cfg), aux))
  def _():
    _, ds = _tile_grads(cfg, refs[:6], aux, q_block, k_block)
    acc_ref[...] += _dot(ds.astype(refs[1].dtype), refs[1][...])

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _tiled_dkdv_kernel(*refs, cfg: _Config):
  """Program (b, kv_head, j, g, i): over the group's query heads g and the query blocks i that
  see key block j, dk [bk, d] and dv [bk, d] are summed in VMEM."""
  aux, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_aux(cfg, refs[6:])
  q_ref, do_ref = refs[0], refs[3]
  k_block, group, q_block = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  first = (group == 0) & (q_block == 0)
  last = (group == pl.num_programs(3) - 1) & (q_block == pl.num_programs(4) - 1)

  @pl.when(first)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  lo_hi = _q_block_range(k_block, cfg, pl.cdiv(cfg.seq_len, cfg.block_q))
  @pl.when(_tile_computes(cfg, q_block, lo_hi, aux))
  def _():
    p, ds = _tile_grads(cfg, refs[:6], aux, q_block, k_block)
    dk_acc[...] += _dot(ds.T.astype(q_ref.dtype), q_ref[...])
    dv_acc[...] += _dot(p.T.astype(do_ref.dtype), do_ref[...])

  @pl.when(last)
  def _():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _tiled_aux_specs(cfg: _Config, q_map, k_map) -> list[pl.BlockSpec]:
  """Tile-sized BlockSpecs of (q_seg, k_seg, prefix); q_map / k_map give the grid step's query /
  key block."""
  return _present_aux(
      cfg, pl.BlockSpec((None, cfg.block_q, 1), lambda b, *ix: (b, q_map(b, *ix), 0)),
      pl.BlockSpec((None, 1, cfg.block_k), lambda b, *ix: (b, 0, k_map(b, *ix))))


def _tiled_call(kernel, cfg: _Config, name: str, grid, sequential: int, in_specs, out_specs,
                out_shape, scratch, *args):
  """pallas_call over `grid`, whose last `sequential` dimensions accumulate in VMEM scratch."""
  params = _compiler_params(cfg, ("parallel",) * (len(grid) - sequential)
                            + ("arbitrary",) * sequential)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), out_shape=out_shape, grid=grid, in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=[_vmem(shape) for shape in scratch],
      interpret=cfg.interpret, compiler_params=params, name=name)(*args)


def _vmem(shape):
  from jax.experimental.pallas import tpu as pl_tpu  # pylint: disable=g-import-not-at-top
  return pl_tpu.VMEM(shape, jnp.float32)


def _tiled_query_specs(cfg: _Config, head_dim: int):
  """Specs for a (b, h, i, j) grid: q-like [bq, d], k/v [bk, d] of head h // groups (the visible
  block nearest j), row statistics [bq, 1], and the aux specs."""
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  k_at = lambda b, h, i, j: _block_at(j, *_kv_block_range(i, cfg))
  kv_map = lambda b, h, i, j: (b, h // g, k_at(b, h, i, j), 0)
  return (pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0)),
          pl.BlockSpec((None, None, bk, head_dim), kv_map),
          pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j: (b, h, i, 0)),
          _tiled_aux_specs(cfg, lambda b, h, i, j: i, k_at))


def _tiled_forward(cfg: _Config, q, k, v, aux):
  """q [b, h, q_pad, d], k/v [b, kvh, kv_pad, d] -> (out like q, lse [b, h, q_pad, 1])."""
  batch, heads, q_pad, head_dim = q.shape
  q_spec, kv_spec, row_spec, aux_specs = _tiled_query_specs(cfg, head_dim)
  return _tiled_call(
      _tiled_fwd_kernel, cfg, "flash_attention_fwd",
      (batch, heads, q_pad // cfg.block_q, k.shape[2] // cfg.block_k), 1,
      [q_spec, kv_spec, kv_spec, *aux_specs], (q_spec, row_spec),
      (jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32)),
      [(cfg.block_q, 1), (cfg.block_q, 1), (cfg.block_q, head_dim)], q, k, v, *aux)


def _tiled_backward(cfg: _Config, q, k, v, aux, lse, do, delta):
  """Gradients (dq, dk, dv) shaped like (q, k, v); delta = rowsum(do * out) [b, h, q_pad, 1]."""
  batch, heads, q_pad, head_dim = q.shape
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  num_q, num_k = q_pad // bq, k.shape[2] // bk
  q_spec, kv_spec, row_spec, aux_specs = _tiled_query_specs(cfg, head_dim)
  dq = _tiled_call(
      _tiled_dq_kernel, cfg, "flash_attention_dq", (batch, heads, num_q, num_k), 1,
      [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *aux_specs], q_spec,
      jax.ShapeDtypeStruct(q.shape, q.dtype), [(bq, head_dim)], q, k, v, do, lse, delta, *aux)
  # Grid (b, kv_head, j, g, i): query head h * groups + g, its query block nearest the visible i.
  q_at = lambda b, h, j, gi, i: _block_at(i, *_q_block_range(j, cfg, pl.cdiv(cfg.seq_len, bq)))
  group_map = lambda b, h, j, gi, i: (b, h * g + gi, q_at(b, h, j, gi, i), 0)
  group_spec = pl.BlockSpec((None, None, bq, head_dim), group_map)
  group_rows = pl.BlockSpec((None, None, bq, 1), group_map)
  k_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, gi, i: (b, h, j, 0))
  dk, dv = _tiled_call(
      _tiled_dkdv_kernel, cfg, "flash_attention_dkdv",
      (batch, k.shape[1], num_k, g, num_q), 2,  # over the group's heads and i
      [group_spec, k_spec, k_spec, group_spec, group_rows, group_rows,
       *_tiled_aux_specs(cfg, q_at, lambda b, h, j, gi, i: j)], (k_spec, k_spec),
      (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      [(bk, head_dim), (bk, head_dim)], q, k, v, do, lse, delta, *aux)
  return dq, dk, dv


# ----------------------------------------------------------------------------- pure-JAX blockwise


def _slice(x, start, size, axis):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _jax_aux(cfg: _Config, aux) -> _Aux:
  """aux arrays -> _Aux of q-like [b,1,1,q_pad,1] and k-like [b,1,1,1,kv_pad] arrays or None."""
  return _Aux.of(cfg, [x[:, None, None] for x in aux])


def _jax_mask(cfg: _Config, aux: _Aux, q_start, k_start):
  """The mask [b or 1, 1, 1, bq, bk] of the (query block, key block) at these offsets. (With
  explicit positions every block pair is visited and masked: no position-based skip here.)"""
  bq, bk = cfg.block_q, cfg.block_k
  rows = lambda x: _slice(x, q_start, bq, 3)
  cols = lambda x: _slice(x, k_start, bk, 4)
  return _mask(cfg, q_start + jnp.arange(bq)[:, None], k_start + jnp.arange(bk)[None, :],
               rows(aux.q_seg), cols(aux.k_seg), cols(aux.prefix), rows(aux.q_pos),
               cols(aux.k_pos))


def _unblock(x):
  """[num_blocks, b, kvh, (g,) block, f] -> [b, kvh * g, num_blocks * block, f]."""
  x = jnp.moveaxis(x, 0, -3)
  return x.reshape(x.shape[0], -1, x.shape[-3] * x.shape[-2], x.shape[-1])


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _jax_forward(cfg: _Config, q, k, v, aux):
  """`_pallas_forward` in pure JAX: lax.map over query blocks, fori_loop over visible key blocks."""
  batch, _, q_pad, head_dim = q.shape
  kv_heads, bq, bk = k.shape[1], cfg.block_q, cfg.block_k
  q5 = q.reshape(batch, kv_heads, cfg.groups, q_pad, head_dim)  # [b, kvh, g, q_pad, d]
  aux = _jax_aux(cfg, aux)

  def q_step(q_block):
    start = q_block * bq
    qb = _slice(q5, start, bq, 3)

    def body(k_block, carry):
      kstart = k_block * bk
      kb, vb = _slice(k, kstart, bk, 2), _slice(v, kstart, bk, 2)  # [b, kvh, bk, d]
      mask = _jax_mask(cfg, aux, start, kstart)
      s, _ = _softcap(_einsum("bhgqd,bhkd->bhgqk", qb, kb), cfg)
      return _online_update(carry, s, mask,
                            lambda p: _einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vb))

    rows = qb.shape[:-1] + (1,)
    init = (jnp.full(rows, MASK_VALUE, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(qb.shape, jnp.float32))
    out, lse = _finish(*jax.lax.fori_loop(*_kv_block_range(q_block, cfg), body, init))
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(q_step, jnp.arange(q_pad // bq))
  return _unblock(out), _unblock(lse)


def _jax_backward(cfg: _Config, q, k, v, aux, lse, do, delta):
  """`_pallas_backward` in pure JAX: dq by query blocks, dk/dv by key blocks."""
  batch, _, q_pad, head_dim = q.shape
  kv_heads, bq, bk = k.shape[1], cfg.block_q, cfg.block_k
  q5, do5, lse5, delta5 = (x.reshape(batch, kv_heads, cfg.groups, q_pad, x.shape[-1])
                           for x in (q, do, lse, delta))
  aux = _jax_aux(cfg, aux)

  def block_grads(q_start, k_start):
    """(p, ds) [b, kvh, g, bq, bk] of one (query block, key block) pair, and its slices."""
    qb, dob, kb, vb = (_slice(q5, q_start, bq, 3), _slice(do5, q_start, bq, 3),
                       _slice(k, k_start, bk, 2), _slice(v, k_start, bk, 2))
    mask = _jax_mask(cfg, aux, q_start, k_start)
    s, dcap = _softcap(_einsum("bhgqd,bhkd->bhgqk", qb, kb), cfg)
    p, ds = _probs_and_dscores(s, dcap, mask, _slice(lse5, q_start, bq, 3),
                               _slice(delta5, q_start, bq, 3),
                               _einsum("bhgqd,bhkd->bhgqk", dob, vb))
    return p, ds, qb, dob, kb

  def dq_step(q_block):
    def body(k_block, dq):
      _, ds, _, _, kb = block_grads(q_block * bq, k_block * bk)
      return dq + _einsum("bhgqk,bhkd->bhgqd", ds.astype(k.dtype), kb)
    dq = jnp.zeros((batch, kv_heads, cfg.groups, bq, head_dim), jnp.float32)
    return jax.lax.fori_loop(*_kv_block_range(q_block, cfg), body, dq)

  def dkdv_step(k_block):
    def body(q_block, carry):
      p, ds, qb, dob, _ = block_grads(q_block * bq, k_block * bk)
      return (carry[0] + _einsum("bhgqk,bhgqd->bhkd", ds.astype(q.dtype), qb),
              carry[1] + _einsum("bhgqk,bhgqd->bhkd", p.astype(do.dtype), dob))
    zeros = jnp.zeros((batch, kv_heads, bk, head_dim), jnp.float32)
    lo, hi = _q_block_range(k_block, cfg, pl.cdiv(cfg.seq_len, bq))
    return jax.lax.fori_loop(lo, hi, body, (zeros, zeros))

  dq = _unblock(jax.lax.map(dq_step, jnp.arange(q_pad // bq))) * cfg.scale
  dk, dv = jax.lax.map(dkdv_step, jnp.arange(k.shape[2] // bk))
  return (dq.astype(q.dtype), (_unblock(dk) * cfg.scale).astype(k.dtype),
          _unblock(dv).astype(v.dtype))


# ----------------------------------------------------------------------------- custom_vjp core


def _impl(cfg: _Config, looped, tiled, pure_jax):
  """Triton (GPU) runs the looped kernels; Mosaic (TPU) and the CPU interpreter the tiled ones."""
  if cfg.impl != "pallas":
    return pure_jax
  return looped if cfg.backend == "gpu" else tiled


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, aux):
  """Heads-major padded attention: q [b, h, q_pad, d], k/v [b, kvh, kv_pad, d]; aux: int ids
  and positions (`_present_aux`'s order), which get no gradient."""
  return _attention_fwd(cfg, q, k, v, aux)[0]


def _attention_fwd(cfg: _Config, q, k, v, aux):
  out, lse = _impl(cfg, _pallas_forward, _tiled_forward, _jax_forward)(cfg, q, k, v, aux)
  return out, (q, k, v, aux, out, lse)


def _attention_bwd(cfg: _Config, residuals, d_out):
  q, k, v, aux, out, lse = residuals
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax-backward row term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  backward = _impl(cfg, _pallas_backward, _tiled_backward, _jax_backward)
  return (*backward(cfg, q, k, v, aux, lse, d_out, delta), tuple(None for _ in aux))


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- public API


def _check_options(q, k, segment_ids, kv_segment_ids, prefix_mask, q_positions, kv_positions,
                   sliding_window, logit_softcap, block_q, block_k) -> None:
  """ValueErrors for everything `check_attention_shapes` does not cover."""
  if (q_positions is None) != (kv_positions is None):
    raise ValueError("pass both q_positions and kv_positions, or neither.")
  if q_positions is None and q.shape[:2] != k.shape[:2]:
    raise ValueError(f"flash attention is self-attention: q and k/v need the same [batch, seq]; "
                     f"got q {q.shape[:2]} and k {k.shape[:2]}. Pass q_positions and "
                     "kv_positions for a shard of queries against longer keys; use "
                     "reference_attention for cross-attention or decoding with a cache.")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k/v need the same batch; got {q.shape[0]} and {k.shape[0]}.")
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids needs segment_ids (the queries' ids) too.")
  q_shape, kv_shape = q.shape[:2], k.shape[:2]
  if segment_ids is not None and kv_segment_ids is None and q_shape != kv_shape:
    raise ValueError(f"segment_ids alone must fit both q and k/v; with q {q_shape} and k/v "
                     f"{kv_shape} pass kv_segment_ids for the keys.")
  seq = "[batch, seq]" if q_positions is None else "[batch, q_len]"
  kv_seq = "[batch, seq]" if q_positions is None else "[batch, kv_len]"
  for name, ids, shape, dims in (
      ("segment_ids", segment_ids, q_shape, seq), ("kv_segment_ids", kv_segment_ids, kv_shape,
                                                   kv_seq),
      ("prefix_mask", prefix_mask, kv_shape, kv_seq), ("q_positions", q_positions, q_shape, seq),
      ("kv_positions", kv_positions, kv_shape, kv_seq)):
    if ids is not None and tuple(ids.shape) != shape:
      raise ValueError(f"{name} must be {dims} = {shape}; got shape {ids.shape}.")
  if sliding_window is not None and int(sliding_window) < 1:
    raise ValueError(f"sliding_window must be a positive int or None; got {sliding_window}.")
  if logit_softcap is not None and not float(logit_softcap) > 0:
    raise ValueError(f"logit_softcap must be a positive float or None; got {logit_softcap}.")
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block is not None and int(block) < 1:
      raise ValueError(f"{name} must be a positive int or None (backend default); got {block}.")


def _prepare(q, k, v, *, causal, segment_ids, prefix_mask, sliding_window, logit_softcap, scale,
             block_q, block_k, impl, interpret, backend=None, kv_segment_ids=None,
             q_positions=None, kv_positions=None):
  """Validates; returns the static config and heads-major padded (q, k, v, aux)."""
  num_heads, num_kv_heads = check_attention_shapes(q, k, v)
  _check_options(q, k, segment_ids, kv_segment_ids, prefix_mask, q_positions, kv_positions,
                 sliding_window, logit_softcap, block_q, block_k)
  q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[3]
  # The pure-JAX loop prefers big blocks on every backend: it takes the CPU sizes.
  backend = _backend(backend) if impl == "pallas" else "cpu"
  mosaic = backend == "tpu" and not interpret
  kind = tpu_device_kind() if mosaic else None
  default_q, default_k = default_block_sizes(backend, max(q_len, kv_len), head_dim,
                                             device_kind=kind, itemsize=q.dtype.itemsize)
  block_q = _cap_block(default_q if block_q is None else int(block_q), q_len, backend)
  block_k = _cap_block(default_k if block_k is None else int(block_k), kv_len, backend)
  if mosaic:
    for name, block in (("block_q", block_q), ("block_k", block_k)):
      if block % 128:
        raise ValueError(f"{name}={block} cannot be tiled by the TPU (Mosaic needs a multiple of "
                         f"128 here); the nearest valid sizes are {_nearest(block, 128)}.")
    _check_vmem(block_q, block_k, head_dim, q.dtype.itemsize, kind)
  if backend == "gpu" and not interpret and any(x & (x - 1) for x in (block_q, block_k, head_dim)):
    raise ValueError(f"the Triton kernel needs power-of-two block_q, block_k and head_dim; got "
                     f"{block_q}, {block_k}, {head_dim}. Pick powers of two (or interpret=True).")
  q_pad, kv_pad = pl.cdiv(q_len, block_q) * block_q, pl.cdiv(kv_len, block_k) * block_k
  positions = q_positions is not None
  cfg = _Config(causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
                softcap=None if logit_softcap is None else float(logit_softcap),
                scale=head_dim**-0.5 if scale is None else float(scale), block_q=block_q,
                block_k=block_k, seq_len=q_len, groups=num_heads // num_kv_heads,
                segments=segment_ids is not None, prefix=prefix_mask is not None, impl=impl,
                interpret=bool(interpret), backend=backend,
                kv_len=None if kv_len == q_len else kv_len, positions=positions)

  def pad(x, length):  # [b, seq, ...] -> [b, length, ...]
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

  as_q = lambda ids: pad(jnp.asarray(ids).astype(jnp.int32), q_pad)[:, :, None]  # [b, q_pad, 1]
  as_k = lambda ids: pad(jnp.asarray(ids).astype(jnp.int32), kv_pad)[:, None, :]  # [b, 1, kv_pad]
  present = _Aux(
      q_seg=None if segment_ids is None else as_q(segment_ids),
      k_seg=None if segment_ids is None else as_k(
          segment_ids if kv_segment_ids is None else kv_segment_ids),
      prefix=None if prefix_mask is None else as_k(prefix_mask),
      q_pos=None if not positions else as_q(q_positions),
      k_pos=None if not positions else as_k(kv_positions))
  heads_major = lambda x, length: jnp.swapaxes(pad(x, length), 1, 2)  # -> [b, h, length, d]
  return cfg, (heads_major(q, q_pad), heads_major(k, kv_pad), heads_major(v, kv_pad),
               tuple(x for x in present if x is not None))  # `_present_aux`'s order


def _run(q, k, v, **options) -> jax.Array:
  cfg, args = _prepare(q, k, v, **options)
  out = _attention(cfg, *args)  # [b, h, q_pad, d]
  return jnp.swapaxes(out[:, :, :q.shape[1]], 1, 2)


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, prefix_mask=None,
                    sliding_window: int | None = None, logit_softcap: float | None = None,
                    scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None,
                    backend: str | None = None, kv_segment_ids=None, q_positions=None,
                    kv_positions=None) -> jax.Array:
  """Blockwise softmax self-attention as Pallas kernels (forward and backward).

  Args:
    q: [batch, seq, num_heads, head_dim]; k, v: [batch, seq, num_kv_heads, head_dim], with
      num_kv_heads dividing num_heads (GQA). bf16 or fp32; accumulation is fp32. With positions
      (below), q is [batch, q_len, ...] and k, v [batch, kv_len, ...] of any lengths.
    causal: query i sees keys j <= i (plus the prefix, see below).
    segment_ids: [batch, seq] int or None; tokens attend only within their segment. With
      unequal lengths these are the queries' ids ([batch, q_len]) and kv_segment_ids the keys'.
    prefix_mask: [batch, seq] (per key: [batch, kv_len]) bool/int or None; keys with 1 are
      visible to every query of their segment (prefix-LM). Disables the causal block skip.
    sliding_window: query i sees keys j with i - j < sliding_window.
    logit_softcap: scores become c * tanh(s / c) before masking.
    scale: score scale; default head_dim ** -0.5.
    block_q, block_k: block sizes (None: `default_block_sizes` for this backend), capped to the
      sequence. On GPU keep them powers of two >= 16 (and head_dim a power of two).
    interpret: Pallas interpret mode; None means True on the CPU backend.
    backend: the platform compiled for ('cpu', 'gpu', 'tpu'; None: jax's default backend), e.g.
      'tpu' when compiling ahead of time for TPU devices from a CPU host.
    kv_segment_ids: [batch, kv_len] int or None: the keys' segment ids (None: segment_ids).
    q_positions, kv_positions: [batch, q_len] / [batch, kv_len] int, both or neither: each
      token's index in the full sequence (context parallelism: a zigzag shard of queries against
      the all-gathered keys). The causal mask and the window then compare positions
      (kv_pos <= q_pos, q_pos - kv_pos < window), not array indices. The static block skip
      cannot know their order: the tiled kernels (TPU, CPU interpreter) still skip the compute
      of tiles no pair of which can be visible, judged from the tile's positions; the Triton
      kernels and `blockwise_attention_jax` visit every block and mask it.
  Returns:
    [batch, seq (q_len), num_heads, head_dim] in q's dtype.
  """
  backend = _backend(backend)
  if interpret is None:
    interpret = backend == "cpu"
  return _run(q, k, v, causal=causal, segment_ids=segment_ids, prefix_mask=prefix_mask,
              sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
              block_q=block_q, block_k=block_k, impl="pallas", interpret=interpret,
              backend=backend, kv_segment_ids=kv_segment_ids, q_positions=q_positions,
              kv_positions=kv_positions)


def blockwise_attention_jax(q, k, v, *, causal: bool = True, segment_ids=None, prefix_mask=None,
                            sliding_window: int | None = None, logit_softcap: float | None = None,
                            scale: float | None = None, block_q: int | None = None,
                            block_k: int | None = None, kv_segment_ids=None, q_positions=None,
                            kv_positions=None) -> jax.Array:
  """`flash_attention` in pure JAX (same arguments, same custom_vjp and block skipping; with
  explicit positions it visits every block pair and masks it).

  Memory is linear in seq (no [seq, seq] array, forward or backward); it runs natively on any
  backend, so it is the CPU fallback and what the CPU benchmark measures.
  """
  return _run(q, k, v, causal=causal, segment_ids=segment_ids, prefix_mask=prefix_mask,
              sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale,
              block_q=block_q, block_k=block_k, impl="jax", interpret=False,
              kv_segment_ids=kv_segment_ids, q_positions=q_positions, kv_positions=kv_positions)
