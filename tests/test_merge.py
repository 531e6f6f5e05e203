"""Model merging (cpt/merge.py) against numpy references written from the papers, and
`pretrainx merge` (train/merge_sources.py): sharded streaming, LAWA, exports, bad input.

The references below are written from the papers (and mergekit's documented conventions);
tests/test_merge_mergekit.py compares `pretrainx merge --hf` with mergekit itself.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_experiment

from pretrainx.cpt import merge

RNG = np.random.default_rng(0)


def _trees(n, shape=(4, 6)):
  return [{"a": {"w": RNG.normal(size=shape).astype(np.float32)},
           "b": RNG.normal(size=(5,)).astype(np.float32)} for _ in range(n)]


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _close(got, want, tol=1e-5):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol),
               got, want)


# -- numpy references ----------------------------------------------------------------------------

def np_ties(base, xs, w, density):
  """TIES-Merging (Yadav et al. 2023, Alg. 1): for each task t, tau_t = theta_t - theta_init;
  trim: keep the top-k% magnitudes of tau_t ("tau_hat_t"); elect: gamma_m = sgn(sum_t tau_hat_t);
  disjoint merge: A_p = {t : sgn(tau_hat_t^p) = gamma_m^p}, tau_m^p = 1/|A_p| sum_{t in A_p}
  tau_hat_t^p; theta_m = theta_init + lambda * tau_m. Weights as mergekit: the mean is weighted,
  sum_{A_p} w_t tau_hat_t / sum_{A_p} w_t."""
  taus = []
  for x in xs:
    tau = (x - base).ravel()
    k = int(density * tau.size)
    keep = np.zeros(tau.size, bool)
    keep[np.argsort(-np.abs(tau), kind="stable")[:k]] = True
    taus.append(np.where(keep, tau, 0).reshape(base.shape))
  weighted = np.stack([wi * t for wi, t in zip(w, taus)])
  gamma = np.where(weighted.sum(0) >= 0, 1.0, -1.0)
  agree = np.sign(weighted) == gamma
  num = np.where(agree, weighted, 0).sum(0)
  den = np.where(agree, np.asarray(w).reshape(-1, *([1] * base.ndim)), 0).sum(0)
  return base + num / np.where(den == 0, 1, den)


def np_slerp(a, b, t):
  """Shoemake's slerp: with cos(Omega) = <a/|a|, b/|b|>,
  slerp(a, b; t) = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b,
  and (1-t) a + t b when |cos(Omega)| > 0.9995 (nearly colinear)."""
  dot = np.sum(a / np.linalg.norm(a) * b / np.linalg.norm(b))
  if abs(dot) > 0.9995:
    return (1 - t) * a + t * b
  omega = np.arccos(dot)
  return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def np_dare(base, xs, w, density, masks):
  """DARE (Yu et al. 2023, Eq. 2): m_t ~ Bernoulli(p) with p = 1 - density the drop rate;
  delta_tilde_t = (1 - m_t) * delta_t; delta_hat_t = delta_tilde_t / (1 - p); then
  theta = theta_base + sum_t w_t delta_hat_t. `masks` are the kept entries (1 - m_t)."""
  return base + sum(wi * np.where(k, (x - base) / density, 0) for wi, x, k in zip(w, xs, masks))


# -- the math ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", merge.METHODS)
def test_identical_models_merge_to_themselves(method):
  (tree,) = _trees(1)
  s = merge.MergeSettings(method, density=0.5)
  trees = (tree, tree) if method == "slerp" else (tree, tree, tree)
  base = tree if method in merge.NEEDS_BASE else None
  _close(merge.merge(s, trees, base), tree)


def test_linear_and_task_arithmetic_match_numpy():
  base, x, y = _trees(3)
  _close(merge.linear([x, y]), jax.tree.map(lambda a, b: (a + b) / 2, x, y))
  _close(merge.linear([x, y], [3.0, 1.0]), jax.tree.map(lambda a, b: (3 * a + b) / 4, x, y))
  _close(merge.linear([x, y], [2.0, 1.0], normalize=False),
         jax.tree.map(lambda a, b: 2 * a + b, x, y))
  # a chat vector: cpt + (instruct - base) = base + 1 (cpt - base) + 1 (instruct - base)
  _close(merge.task_arithmetic(base, [x, y], [1.0, 1.0]),
         jax.tree.map(lambda b, c, i: c + (i - b), base, x, y))
  _close(merge.task_arithmetic(base, [x, y], [0.5, -0.7]),
         jax.tree.map(lambda b, c, i: b + 0.5 * (c - b) - 0.7 * (i - b), base, x, y))


def test_rules_override_per_parameter():
  x, y = _trees(2)
  got = merge.linear([x, y], [1.0, 1.0], rules=[("^a/", {"weights": [1.0, 0.0]}),
                                                ("a", {"weights": [0.0, 1.0]})])
  _close(got["a"]["w"], x["a"]["w"])  # the first match wins
  _close(got["b"], (x["b"] + y["b"]) / 2)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_ties_matches_numpy(density):
  base, x, y, z = _trees(4)
  w = [1.0, 0.6, 0.3]
  got = merge.ties(base, [x, y, z], w, density)
  _close(got, jax.tree.map(lambda b, *xs: np_ties(b, xs, w, density), base, x, y, z))


def test_dare_matches_numpy_and_is_seeded():
  base, x, y = _trees(3, shape=(64, 32))
  w, density = [1.0, 0.5], 0.3
  got = merge.dare(base, [x, y], w, density, seed=3)
  for name, b, xs in [("a/w", base["a"]["w"], (x["a"]["w"], y["a"]["w"])),
                      ("b", base["b"], (x["b"], y["b"]))]:
    # the drop masks: Bernoulli(density) drawn from the seed and the parameter's name only
    key = jax.random.fold_in(jax.random.key(3), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    masks = [np.asarray(jax.random.bernoulli(jax.random.fold_in(key, i), density, b.shape))
             for i in range(2)]
    want = np_dare(b, xs, w, density, masks)
    _close(got["a"]["w"] if name == "a/w" else got["b"], want)
  kept = np.mean(np.asarray(got["a"]["w"]) != base["a"]["w"])
  assert 0.4 < kept < 0.6  # 1 - 0.7^2 of the entries moved by one of the two
  _close(merge.dare(base, [x, y], w, density, seed=3), got, 0)
  assert not np.allclose(merge.dare(base, [x, y], w, density, seed=4)["b"], got["b"])
  # dare_ties: the dropped-and-rescaled vectors, then TIES' sign election and disjoint mean
  ties_got = merge.dare(base, [x, y], w, density, seed=3, sign_election=True, normalize=True)
  key = jax.random.fold_in(jax.random.key(3), zlib.crc32(b"b") & 0x7FFFFFFF)
  dropped = [base["b"] + np.where(jax.random.bernoulli(jax.random.fold_in(key, i), density, (5,)),
                                  (v["b"] - base["b"]) / density, 0) for i, v in enumerate([x, y])]
  _close(ties_got["b"], np_ties(base["b"], dropped, w, 1.0))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_numpy(t):
  a, b = _trees(2)
  _close(merge.slerp(a, b, t), jax.tree.map(lambda x, y: np_slerp(x, y, t), a, b))
  near = jax.tree.map(lambda x: x * 2.0 + 1e-4, a)  # colinear: plain interpolation
  _close(merge.slerp(a, near, t), jax.tree.map(lambda x, y: (1 - t) * x + t * y, a, near))


def test_layers_and_vocabulary_padding_merge_per_hf_tensor():
  """With the ModelConfig, TIES' trim and SLERP's angle work per layer of a scanned stack and on
  the vocabulary's rows only (padding: the base's), as mergekit merges each HF tensor."""
  import types

  cfg = types.SimpleNamespace(vocab_size=5)
  base, x, y = [{"layers": {"w": RNG.normal(size=(3, 4, 6)).astype(np.float32)},
                 "embed": {"embedding": RNG.normal(size=(8, 4)).astype(np.float32)}}
                for _ in range(3)]
  assert merge.tensor_layout(cfg, "layers/moe/up_proj") == {"stacked": 2, "vocab": None}
  got = merge.merge(merge.MergeSettings("ties", (1.0, 0.5), 0.3), [x, y], base, cfg)
  for i in range(3):
    w = lambda t, i=i: t["layers"]["w"][i]
    _close(got["layers"]["w"][i], np_ties(w(base), (w(x), w(y)), [1.0, 0.5], 0.3))
  e = lambda t: t["embed"]["embedding"]
  _close(e(got)[:5], np_ties(e(base)[:5], (e(x)[:5], e(y)[:5]), [1.0, 0.5], 0.3))
  _close(e(got)[5:], e(base)[5:])
  got = merge.merge(merge.MergeSettings("slerp", t=0.3), [x, y], None, cfg)
  for i in range(3):
    _close(got["layers"]["w"][i], np_slerp(x["layers"]["w"][i], y["layers"]["w"][i], 0.3))
  _close(e(got)[:5], np_slerp(e(x)[:5], e(y)[:5], 0.3))


def test_math_refusals():
  base, x = _trees(2)
  with pytest.raises(ValueError, match="needs a base"):
    merge.merge(merge.MergeSettings("ties"), [x, x])
  with pytest.raises(ValueError, match="exactly two"):
    merge.merge(merge.MergeSettings("slerp"), [x, x, base])
  with pytest.raises(ValueError, match="density"):
    merge.MergeSettings("ties", density=0.0)


def test_sharded_jit_equals_unsharded():
  """The math under jit on arrays split over 8 devices gives the unsharded result."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  base, x, y = _trees(3, shape=(16, 8))
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  put = lambda t: jax.tree.map(
      lambda v: jax.device_put(v, NamedSharding(mesh, P("d") if v.ndim == 2 else P())), t)
  for method in ("ties", "dare_ties", "slerp"):
    s = merge.MergeSettings(method, density=0.5, seed=1)
    trees, b = ((x, y), None) if method == "slerp" else ((x, y), base)
    want = merge.merge(s, trees, b)
    sharded = jax.jit(lambda ts, bb, s=s: merge.merge(s, ts, bb))(
        tuple(put(t) for t in trees), None if b is None else put(b))
    assert sharded["a"]["w"].sharding.spec == P("d")
    _close(sharded, _np(want))


# -- sources, streaming, LAWA, the CLI -----------------------------------------------------------

def _export(exp, path, seed):
  """A params export of a freshly initialised model of `exp`."""
  import flax.linen as nn

  from pretrainx import checkpoint
  from pretrainx.config import experiment_to_gin
  from pretrainx.model import Transformer

  params = nn.unbox(Transformer(exp.model).init(jax.random.key(seed),
                                                jnp.zeros((1, 8), jnp.int32)))["params"]
  checkpoint.save_params(str(path), params, {"step": 0, "config_gin": experiment_to_gin(exp)})
  return str(path), _np(params)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Three exports of the tiny model, one with another vocabulary, one with another width, and a
  run's checkpoints of steps 1-3 (written by its Checkpointer with the meta the loop writes, from
  three inits: training them would compile the train step, most of this file's time)."""
  from pretrainx.checkpoint import Checkpointer
  from pretrainx.config import experiment_to_gin
  from pretrainx.train.runtime import build_runtime
  from pretrainx.train.state import new_state

  root = tmp_path_factory.mktemp("merge")
  exp = tiny_experiment(root / "run", run={"steps": 3, "eval_every": 0},
                        checkpoint={"every_steps": 1, "keep_last": 5})
  exports = [_export(exp, root / f"m{i}", i) for i in range(3)]
  vocab = _export(exp.replace(model={"vocab_size": 300}), root / "vocab", 5)[0]
  wide = _export(exp.replace(model={"embed_dim": 32, "head_dim": 8}), root / "wide", 6)[0]
  rt = build_runtime(exp)
  storage_dir = root / "run"
  storage_dir.mkdir()
  (storage_dir / "config.gin").write_text(experiment_to_gin(exp))
  ckpt = Checkpointer(str(storage_dir / "checkpoints"), exp.checkpoint)
  make = jax.jit(lambda p: new_state(p, rt.optimizer), out_shardings=rt.shardings)
  for step, (_, params) in enumerate(exports, 1):
    with rt.scope():
      state = make(params)
    ckpt.save(step, state, {"step": step, "config_gin": experiment_to_gin(exp)}, block=True)
  ckpt.close()
  return dataclasses.make_dataclass("World", ["root", "exp", "exports", "vocab", "wide"])(
      root, exp, exports, vocab, wide)


def _read_export(path, like):
  from pretrainx.checkpoint import load_params

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  return _np(load_params(path, abstract)[0])


def test_streamed_sharded_merge_equals_in_memory(world):
  """Orbax group by group (about 200 kB per group: 4 groups) on 8 devices (fsdp) equals the
  whole trees merged on one device."""
  from pretrainx.config import MeshConfig
  from pretrainx.sharding import make_mesh
  from pretrainx.train import merge_sources as ms

  (p0, t0), (p1, t1), (p2, t2) = world.exports
  s = merge.MergeSettings("ties", (1.0, 0.5), density=0.4)
  srcs = [ms.open_source(p) for p in (p1, p2)]
  assert len(ms.param_groups(ms.abstract_params(world.exp.model, ms.merge_mesh(world.exp.model),
                                                MeshConfig().rules), 200_000)) > 1
  streamed = ms.merge_models(srcs, s, ms.open_source(p0), group_bytes=200_000)
  layer = streamed["layers"]["mlp"]["up_proj"]
  assert len(layer.sharding.device_set) == 8 and not layer.sharding.is_fully_replicated
  one = make_mesh(MeshConfig(), jax.devices()[:1])
  whole = ms.merge_models(srcs, s, ms.open_source(p0), mesh=one)
  _close(_np(streamed), _np(whole))
  # per layer of the scanned stack, the vocabulary's padding left out (merge.tensor_layout)
  _close(_np(whole), _np(merge.merge(s, [t1, t2], t0, cfg=world.exp.model)))


def test_lawa_equals_mean_of_checkpoints(world, run_cli, tmp_path):
  from pretrainx.checkpoint import Checkpointer
  from pretrainx.train.runtime import build_runtime

  run = str(world.root / "run")
  out = str(tmp_path / "lawa")
  res = run_cli("merge", run, "--average_last=2", "--out", out)
  assert res.returncode == 0, res.stderr
  assert "steps [2, 3]" in res.stdout
  rt = build_runtime(world.exp)
  ckpt = Checkpointer(str(world.root / "run" / "checkpoints"), create=False)
  with rt.scope():
    states = [ckpt.restore(rt.abstract_state, s)[0].params for s in (2, 3)]
  ckpt.close()
  mean = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *states)
  _close(_read_export(out, mean), mean, 1e-6)
  res = run_cli("merge", run, "--average_last=2", "--every=2", "--out", str(tmp_path / "e"))
  assert res.returncode == 0 and "steps [1, 3]" in res.stdout, res.stderr
  res = run_cli("merge", run, "--average_last=3", "--every=2", "--out", str(tmp_path / "f"))
  assert res.returncode == 2 and "stride of 2" in res.stderr


def test_merged_export_loads_as_source(world, run_cli, tmp_path):
  """A chat-vector merge through the CLI, loaded by load_source on a run's mesh."""
  from pretrainx.config import InitConfig
  from pretrainx.train.init import load_source
  from pretrainx.train.runtime import build_runtime

  (p0, t0), (p1, t1), (p2, t2) = world.exports
  out = str(tmp_path / "chat")
  res = run_cli("merge", p1, p2, "--method", "task_arithmetic", "--base", p0, "--weights",
                "1,1", "--out", out)
  assert res.returncode == 0, res.stderr
  rt = build_runtime(world.exp)
  with rt.scope():
    cfg, params, _, step = load_source(rt, InitConfig(source=out), "export")
  assert cfg == world.exp.model and step == 0
  _close(_np(params), jax.tree.map(lambda b, c, i: c + (i - b), t0, t1, t2))


def test_bad_input_is_one_line(world, run_cli, tmp_path):
  (p0, _), (p1, _), _ = world.exports
  out = str(tmp_path / "x")
  cases = [((p0, world.vocab), "vocab_size=259", "vocab_size=300"),
           ((p0, world.wide), "different architectures", "embed_dim 64 vs 32"),
           ((p0, p1, "--method", "ties"), "needs a base model", "--base"),
           ((p0, p1, "--method", "task_arithmetic"), "needs a base model", "--base"),
           ((p0, p1, world.wide, "--method", "slerp"), "exactly two", "two sources")]
  for args, *wanted in cases:
    res = run_cli("merge", *args, "--out", out)
    assert res.returncode == 2, (args, res.stderr)
    line = res.stderr.strip()
    assert "\n" not in line and all(w in line for w in wanted), line


def test_hf_models_merge_into_an_hf_directory_transformers_loads(run_cli, tmp_path):
  """Two Hugging Face Llamas of one architecture, linearly merged with `--hf`: transformers
  loads the output, and its weights are the numpy weighted mean of the inputs'."""
  import torch
  import transformers

  cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
  dirs = []
  for seed in (0, 1):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(tmp_path / f"hf{seed}", safe_serialization=True)
    dirs.append(str(tmp_path / f"hf{seed}"))
  run = run_cli("merge", *dirs, "--method=linear", "--weights=3,1", "--hf",
                f"--out={tmp_path / 'merged'}")
  assert run.returncode == 0, run.stderr
  merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
  inputs = [transformers.LlamaForCausalLM.from_pretrained(d).state_dict() for d in dirs]
  for name, value in merged.state_dict().items():
    want = 0.75 * inputs[0][name].numpy() + 0.25 * inputs[1][name].numpy()
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
