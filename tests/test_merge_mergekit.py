"""`pretrainx merge --hf` against mergekit 0.1.5 run in-process on the same tiny HF Llamas: every
tensor of the two outputs equal (fp32, rtol 1e-5, atol 1e-6), per method.

How our flags map onto mergekit's configuration (merge_methods/registry.py, its defaults):
- linear: `weight` per model, normalize (default true) = our default --normalize.
- task_arithmetic: base_model = --base, normalize false by default, as ours.
- ties: density per model = --density, normalize true by default (ours too); int8_mask only
  changes the dtype of the sign mask, not a number; our trim keeps every entry tied at the k-th
  magnitude where mergekit's argsort keeps exactly k (random weights: no ties here).
- dare_ties and dare_linear (= our `dare`): normalize false by default (ours too). Their random
  drop (torch.bernoulli) cannot match our JAX masks, and mergekit 0.1.5 rescales the kept entries
  to the tensor's L1 norm where we divide by the density (the paper's 1/(1-p)); at density 1
  neither drops nor rescales, so the non-random rest of each method is compared.
- slerp: mergekit's `t` runs from its base_model (t=0) to the other model: `base_model: A,
  models: [A, B], t` is our `A B --t` (t=0 is the first source).
mergekit merges each Hugging Face tensor alone (one per layer) and has no vocabulary padding: our
TIES trim and SLERP angle work per layer of the scanned stack and on the real vocabulary rows
(cpt/merge.py tensor_layout); hidden 32 and vocab 300 (padded to 384) test both. Without a
tokenizer_source mergekit merges the embeddings and lm_head as any other tensor, as we do.
"""

import pathlib

import numpy as np
import pytest

pytest.importorskip("mergekit")

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
NOISE = 0.02  # a fine-tune's noise, as large as the init's std: SLERP angles well off colinear


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{base, ft1, ft2}: HF Llama directories (safetensors, fp32); the base randomly initialised
  (its norms perturbed off 1), each fine-tune the base plus its own Gaussian noise."""
  import torch
  import transformers

  root = tmp_path_factory.mktemp("mergekit_models")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**CFG)
  state = transformers.LlamaForCausalLM(config).state_dict()
  dirs = {}
  for i, name in enumerate(("base", "ft1", "ft2")):
    gen = torch.Generator().manual_seed(100 + i)
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict({k: v + NOISE * torch.randn(v.shape, generator=gen)
                           for k, v in state.items()})
    model.save_pretrained(root / name, safe_serialization=True)
    dirs[name] = str(root / name)
  return dirs


def _tensors(directory) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  out = {}
  for file in sorted(pathlib.Path(directory).glob("*.safetensors")):
    out.update(load_file(file))
  return out


def _mergekit(config: dict, out) -> dict[str, np.ndarray]:
  from mergekit.config import MergeConfiguration
  from mergekit.merge import run_merge
  from mergekit.options import MergeOptions

  options = MergeOptions(device="cpu", lazy_unpickle=False, copy_tokenizer=False,
                         write_model_card=False, quiet=True, allow_crimes=False)
  run_merge(MergeConfiguration.model_validate({"dtype": "float32", **config}), str(out), options)
  return _tensors(out)


# name -> (mergekit config over {base, ft1, ft2}, our CLI flags after the sources)
CASES = {
    "ties": ({"merge_method": "ties", "base_model": "base",
              "models": [("ft1", {"weight": 1.0, "density": 0.5}),
                         ("ft2", {"weight": 0.5, "density": 0.5})]},
             ["ft1", "ft2", "--method=ties", "--base=base", "--weights=1,0.5", "--density=0.5"]),
    "slerp": ({"merge_method": "slerp", "base_model": "ft1", "parameters": {"t": 0.3},
               "models": [("ft1", {}), ("ft2", {})]},
              ["ft1", "ft2", "--method=slerp", "--t=0.3"]),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base",
                         "models": [("ft1", {"weight": 1.0}), ("ft2", {"weight": -0.5})]},
                        ["ft1", "ft2", "--method=task_arithmetic", "--base=base",
                         "--weights=1,-0.5"]),
    "linear": ({"merge_method": "linear",
                "models": [("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.3})]},
               ["ft1", "ft2", "--method=linear", "--weights=0.7,0.3"]),
    # density 1: mergekit's bernoulli drop cannot match our JAX RNG; the rest of the method can
    "dare_ties": ({"merge_method": "dare_ties", "base_model": "base",
                   "models": [("ft1", {"weight": 1.0, "density": 1.0}),
                              ("ft2", {"weight": 0.5, "density": 1.0})]},
                  ["ft1", "ft2", "--method=dare_ties", "--base=base", "--weights=1,0.5",
                   "--density=1", "--seed=3"]),
    "dare_linear": ({"merge_method": "dare_linear", "base_model": "base",
                     "models": [("ft1", {"weight": 1.0, "density": 1.0}),
                                ("ft2", {"weight": 0.5, "density": 1.0})]},
                    ["ft1", "ft2", "--method=dare", "--base=base", "--weights=1,0.5",
                     "--density=1", "--seed=3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_merge_equals_mergekit(case, models, run_cli, tmp_path):
  spec, flags = CASES[case]
  config = {k: models[v] if k == "base_model" else v for k, v in spec.items() if k != "models"}
  config["models"] = [{"model": models[m], "parameters": p} for m, p in spec["models"]]
  want = _mergekit(config, tmp_path / "mergekit")
  args = [models.get(f, f) for f in flags]
  args = [f"--base={models['base']}" if a == "--base=base" else a for a in args]
  res = run_cli("merge", *args, "--hf", f"--out={tmp_path / 'ours'}")
  assert res.returncode == 0, res.stderr
  got = _tensors(tmp_path / "ours")
  assert sorted(got) == sorted(want)
  inputs = [_tensors(models[m]) for m in ("ft1", "ft2")]
  for name, value in want.items():
    assert got[name].dtype == value.dtype == np.float32, name
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{case} {name}")
    # a merge that is neither input (a mapping that copied one model would pass vacuously)
    assert not any(np.allclose(value, x[name]) for x in inputs), f"{case} {name}"
