"""TPU topologies and `pretrainx plan --topology`: the real TPU compiler (libtpu) compiles the train
and eval steps for a v5p slice on this CPU machine and names the Mosaic kernels it compiled; bad
names, meshes and a missing libtpu each get one line."""

import os

import pytest

from pretrainx import topology

from conftest import REPO

@pytest.mark.parametrize("name, gen, grid", [
    ("v5p-8", "v5p", (2, 2, 1)), ("v5p-16", "v5p", (2, 2, 2)), ("v5p-256", "v5p", (4, 4, 8)),
    ("v5p-512", "v5p", (4, 8, 8)), ("v4-64", "v4", (2, 4, 4)), ("v5e-1", "v5e", (1, 1)),
    ("v5litepod-16", "v5e", (4, 4)), ("v6e-8", "v6e", (2, 4)), ("v6e-256", "v6e", (16, 16)),
    ("v5p:8x8x4", "v5p", (8, 8, 4)), ("V6E:2x2", "v6e", (2, 2))])
def test_names_become_chip_grids(name, gen, grid):
  assert topology.parse(name) == (gen, grid)


@pytest.mark.parametrize("name, config, hosts, wrap", [
    ("v5p-8", "megacore", (2, 2, 1), (False, False, False)),
    ("v5p-64", "megacore", (2, 2, 1), (False, False, False)),
    ("v5p-128", "megacore", (2, 2, 1), (True, True, True)),
    ("v5p-256", "megacore", (2, 2, 1), (True, True, True)),
    ("v5p:4x4x12", "megacore", (2, 2, 1), (True, True, True)),
    ("v4-8", "megacore", (2, 2, 1), (False, False, False)),
    ("v4-128", "megacore", (2, 2, 1), (True, True, True)),
    ("v5e-1", "default", (1, 1, 1), (False, False, False)),
    ("v5e-16", "default", (2, 2, 1), (False, False, False)),
    ("v5e-128", "default", (2, 2, 1), (False, True, False)),
    ("v5e-256", "default", (2, 2, 1), (True, True, False)),
    ("v6e-256", "default", (2, 2, 1), (True, True, False))])
def test_slices_are_described_to_libtpu_as_maxtext_does(name, config, hosts, wrap):
  """Chip configuration, chips per host and torus wraparound, as MaxText's
  accelerator_to_spec_map gives them for the same accelerator types (no libtpu needed)."""
  gen, grid = topology.parse(name)
  assert (topology.chip_config(gen), topology.host_bounds(grid),
          topology.wraparound(gen, grid)) == (config, hosts, wrap)


@pytest.mark.parametrize("name, why", [
    ("v5p-7", "v5p has no slice of 7 cores"), ("v5p-4", "v5p has no slice of 4 cores"),
    ("v7x-8", "no TPU generation 'v7x'"), ("v5e:2x2x2", "v5e slices are 2-D grids"),
    ("tpu", "expected GENERATION-N or GENERATION:AxBxC"), ("v6e-12", "v6e has no slice of 12 chips")])
def test_bad_names_list_the_valid_ones(name, why):
  with pytest.raises(ValueError) as err:
    topology.parse(name)
  assert f"unknown TPU topology {name!r}: {why}." in str(err.value)
  assert "v5p-256" in str(err.value) and "v5p:4x4x8" in str(err.value)


@pytest.fixture
def plan_cli(run_cli):
  """`pretrainx plan ARGS` in this process (conftest.run_cli)."""
  return lambda *args: run_cli("plan", *args)


def test_plan_compiles_train_and_eval_steps_for_v5p_with_the_tpu_compiler(plan_cli, monkeypatch):
  """A flash model: the plan counts the Mosaic kernels it compiled, and no step of it (the
  shape-only setup included) announces a pure-JAX fallback, which the TPU never runs."""
  from pretrainx.model import attention
  monkeypatch.setattr(attention, "_WARNED", set())  # the once-per-process fallback notices
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
                 "--mesh=data=1,fsdp=2,tensor=2", "--gin_param=ModelConfig.attention_impl='flash'")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith("AOT plan: 4 devices, mesh data=1 x fsdp=2 x context=1 x expert=1 x tensor=2, 512 tokens "
                             "per step (compiled for TPU v5p-8 (v5p:2x2x1 megacore, hosts 2x2x1, wrap none), "
                             "TPU compiler in ")
  kernels = [l for l in lines if l.startswith("attention (flash): ")]
  assert len(kernels) == 1 and kernels[0].endswith(
      " Pallas (Mosaic) kernel calls in the compiled train step"), lines
  assert int(kernels[0].split()[2]) >= 3  # forward, dq and dk/dv
  assert attention._WARNED == set()  # no fallback announced
  assert "cannot lower" not in out.stdout + out.stderr
  assert any(l.startswith("eval step: compiles, ") for l in lines)
  assert lines[-1].startswith("HBM 95 GiB per device: fits (")
  assert "fake CPU devices" not in out.stdout


def test_plan_exits_1_when_the_run_does_not_fit(plan_cli):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8", "--hbm_gib=0.001")
  assert out.returncode == 1
  assert "HBM 0.001 GiB per device: does not fit by " in out.stdout


def test_plan_refuses_a_mesh_of_another_size(plan_cli):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8", "--mesh=data=2,fsdp=1,tensor=1")
  assert out.returncode == 2
  error = out.stderr.strip().splitlines()[-1]
  assert error.startswith(
      "pretrainx plan: error: topology v5p-8 has 4 devices: mesh axes data=2 x fsdp=1 x context=1 x expert=1 x tensor=1")
  assert "pass --mesh" not in error  # it was passed
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
                 "--gin_param=MeshConfig.data=8", "--gin_param=MeshConfig.fsdp=1")
  assert out.returncode == 2
  assert out.stderr.strip().endswith("(pass --mesh, e.g. --mesh=data=1,fsdp=-1,tensor=1)")


def test_plan_without_libtpu_says_how_to_install(plan_cli, monkeypatch):
  monkeypatch.setattr(topology, "libtpu_available", lambda: False)  # as if it were not installed
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "pretrainx plan: error: --topology=v5p-8: the TPU compiler comes with libtpu: pip install "
      "'pretrainx[tpu]' (or pip install 'jax[tpu]'); without it, plan with fake CPU devices "
      "(--devices=N).")


@pytest.mark.slow
@pytest.mark.parametrize("preset, impl", [("tiny", "flash"), ("tiny", "linear"),
                                          ("tiny", "reference")])
def test_train_step_compiles_for_v5p_over_data_fsdp_tensor(preset, impl):
  """Forward and backward (the whole train step) with the TPU compiler; flash and linear run as
  Mosaic kernels under shard_map (GSPMD alone cannot partition them). Both kernels, and plain
  XLA attention once ('hybrid' is plain XLA too)."""
  from pretrainx.config import parse_gin
  from pretrainx.plan import abstract_batch, mosaic_kernel_count
  from pretrainx.train.runtime import build_runtime
  topo = topology.load("v5p-16")  # 8 chips
  exp = parse_gin([os.path.join(REPO, f"gin_configs/{preset}.gin")],
                  [f"ModelConfig.attention_impl = '{impl}'", "MeshConfig.data = 2",
                   "MeshConfig.fsdp = 2", "MeshConfig.tensor = 2"])
  rt = build_runtime(exp, topo.devices)
  with rt.scope():
    compiled = rt.train_step.lower(rt.abstract_state, abstract_batch(rt.exp, rt.mesh)).compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  assert {d.platform for d in rt.mesh.devices.flat} == {"tpu"}
  mosaic = mosaic_kernel_count(compiled)
  # flash: forward, dq and dk/dv kernels; linear: its forward kernel (packed rows: the state
  # resets at segment starts); reference and hybrid are plain XLA.
  assert mosaic >= {"flash": 3, "linear": 1}.get(impl, 0)
  assert mosaic == 0 or impl in ("flash", "linear")


@pytest.mark.parametrize("impl, binding, message", [
    ("flash", "ModelConfig.flash_block_q = 200",
     "block_q=200 cannot be tiled by the TPU (Mosaic needs a multiple of 128 here); the nearest "
     "valid sizes are 128 or 256."),
    ("linear", "ModelConfig.linear_chunk = 12",
     "chunk_size=12 cannot be tiled by the TPU (Mosaic slices chunks of rows in multiples of 8); "
     "the nearest valid sizes are 8 or 16.")])
def test_block_sizes_the_tpu_cannot_tile_name_the_nearest_valid_ones(impl, binding, message,
                                                                      plan_cli):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
              f"--gin_param=ModelConfig.attention_impl='{impl}'", f"--gin_param={binding}",
              "--gin_param=RunConfig.seq_len=64" if impl == "linear" else
              "--gin_param=ModelConfig.max_seq_len=512", "--gin_param=RunConfig.seq_len=400"
              if impl == "flash" else "--gin_param=RunConfig.seq_len=64")  # 400: block_q divides it
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == f"pretrainx plan: error: {message}"


@pytest.mark.slow
def test_flash_gqa_8_groups_at_seq_8192_compiles_within_vmem(plan_cli):
  """llama_70b's attention shape (8 query heads per kv head, head_dim 128, bf16) at seq 8192, at
  tiny width: every flash kernel tiles the group and the sequence, so its VMEM does not grow with
  them (the dk/dv kernel once held the whole group's rows: 'Used 99.13M of 63.94M vmem')."""
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
                 "--mesh=data=1,fsdp=4,tensor=1",
                 "--gin_param=ModelConfig.attention_impl='flash'",
                 "--gin_param=ModelConfig.num_layers=1", "--gin_param=ModelConfig.scan_unroll=1",
                 "--gin_param=ModelConfig.num_heads=8", "--gin_param=ModelConfig.num_kv_heads=1",
                 "--gin_param=ModelConfig.head_dim=128", "--gin_param=ModelConfig.embed_dim=64",
                 "--gin_param=ModelConfig.dtype='bfloat16'",
                 "--gin_param=ModelConfig.max_seq_len=8192", "--gin_param=RunConfig.seq_len=8192",
                 "--gin_param=RunConfig.global_batch_size=4")
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  kernels = [l for l in out.stdout.splitlines() if l.startswith("attention (flash): ")]
  assert len(kernels) == 1 and int(kernels[0].split()[2]) >= 3, out.stdout


def test_flash_blocks_that_cannot_fit_vmem_name_the_nearest_that_fit(plan_cli):
  """One line and exit 2, before the TPU compiler's RESOURCE_EXHAUSTED dump could come."""
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
                 "--gin_param=ModelConfig.attention_impl='flash'",
                 "--gin_param=ModelConfig.flash_block_q=4096",
                 "--gin_param=ModelConfig.flash_block_k=2048",
                 "--gin_param=ModelConfig.max_seq_len=4096", "--gin_param=RunConfig.seq_len=4096")
  assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "pretrainx plan: error: flash block_q=4096, block_k=2048 need about 158 MiB of VMEM at "
      "head_dim 16, more than a kernel gets on TPU v5p (16 MiB); the nearest sizes that fit are "
      "block_q=1024, block_k=512.")
  assert "RESOURCE_EXHAUSTED" not in out.stdout + out.stderr
