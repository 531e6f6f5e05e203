"""AOT planning: per-device bytes match a hand count, fits/does-not-fit, FLOPs, the fake-device
subprocess and bad --mesh strings."""

import json
import os

import pytest

from conftest import REPO, tiny_experiment
from pretrainx.flops import flops_per_token
from pretrainx.plan import parse_mesh, plan, plan_main, plan_text

pytestmark = pytest.mark.xdist_group("plan")  # its module fixtures are built once

TINY_GIN = os.path.join(REPO, "gin_configs/tiny.gin")


def hand_param_count(m) -> int:
  """The tiny model's parameters, counted from its config: padded embedding (tied head), final
  norm, and per layer q/k/v/o projections, two norms and the SwiGLU MLP."""
  d, hd = m.embed_dim, m.resolved_head_dim
  per_layer = (d * m.num_heads * hd + 2 * d * m.num_kv_heads * hd + m.num_heads * hd * d
               + 2 * d + 3 * d * m.mlp_dim)
  return m.padded_vocab_size * d + d + m.num_layers * per_layer


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp("plan")
  # Unrolled layers, so XLA's cost analysis counts every layer (it counts a scan body once).
  exp = lambda mesh: tiny_experiment(run_dir, mesh=mesh, model={"scan_layers": False})
  fsdp = plan(exp({"data": 1, "fsdp": 8, "tensor": 1}), hbm_gib=95)
  data = plan(exp({"data": 8, "fsdp": 1, "tensor": 1}), devices=8, hbm_gib=1e-6)
  return exp({"data": 1, "fsdp": 8, "tensor": 1}), fsdp, data


@pytest.mark.slow
def test_param_and_optimizer_bytes_match_hand_count(plans):
  exp, fsdp, data = plans
  total = hand_param_count(exp.model) * 4  # fp32
  assert exp.optimizer.name == "adamw" and exp.model.param_dtype == "float32"
  assert fsdp.param_bytes == total // 8  # every tiny param has an 'embed' axis divisible by 8
  assert data.param_bytes == total  # data parallelism replicates params
  for report in (fsdp, data):
    scalars = report.optimizer_bytes - 2 * report.param_bytes  # AdamW mu, nu + int32 counts
    assert 0 < scalars <= 64 and scalars % 4 == 0
  assert fsdp.mesh == {"data": 1, "fsdp": 8, "context": 1, "expert": 1, "tensor": 1}
  assert fsdp.devices == 8


def test_memory_totals_and_hbm_verdict(plans):
  _, fsdp, data = plans
  for r in (fsdp, data):
    assert r.argument_bytes >= r.param_bytes + r.optimizer_bytes
    assert r.temp_bytes > 0 and r.activation_bytes == r.temp_bytes
    assert r.total_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes
  assert fsdp.fits is True and data.fits is False
  assert "per device" in plan_text(fsdp) and ": fits" in plan_text(fsdp)
  assert ": does not fit by " in plan_text(data)
  assert "CPU compile" in plan_text(fsdp)  # says what the memory numbers describe


def test_flops_positive_and_near_analytic(plans):
  exp, fsdp, _ = plans
  tokens = exp.run.global_batch_size * exp.run.seq_len
  analytic = flops_per_token(exp.model, exp.run.seq_len) * tokens
  assert fsdp.flops_source == "xla" and fsdp.analytic_flops_per_step == pytest.approx(analytic)
  assert 0.5 < fsdp.flops_per_step / analytic < 2.0
  assert f"{fsdp.flops_per_step:.3e}" in plan_text(fsdp)


@pytest.mark.slow
def test_scanned_layers_fall_back_to_analytic_flops(tmp_path):
  mesh = {"data": 1, "fsdp": 8, "tensor": 1}
  exp = tiny_experiment(tmp_path, mesh=mesh, model={"scan_unroll": 1})
  assert exp.model.scan_layers
  report = plan(exp)
  assert report.flops_source == "analytic"
  assert report.flops_per_step == report.analytic_flops_per_step > 0
  assert report.fits is None and "HBM" not in plan_text(report)
  # a fully unrolled scan (tiny.gin's scan_unroll = 2 for 2 layers) is loop-free: XLA's count
  unrolled = tiny_experiment(tmp_path, mesh=mesh)
  assert unrolled.model.scan_unroll >= unrolled.model.num_layers
  assert plan(unrolled).flops_source == "xla"


def test_more_devices_than_the_process_has_runs_in_a_subprocess(capsys):
  rc = plan_main([f"--gin_file={TINY_GIN}", "--devices=16", "--mesh=data=1,fsdp=8,tensor=2",
                  "--hbm_gib=95", "--json"])
  out = capsys.readouterr()
  assert rc == 0, out.err
  report = json.loads(out.out)
  assert report["devices"] == 16
  assert report["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "expert": 1, "tensor": 2}
  assert report["fits"] is True
  exp = tiny_experiment("unused")
  total = hand_param_count(exp.model) * 4
  assert total // 16 <= report["param_bytes"] < total // 8  # fsdp shards all, tensor most


def test_plan_in_process_with_other_device_count_says_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="plan_main"):
    plan(tiny_experiment(tmp_path), devices=16)


@pytest.mark.parametrize("text", ["data=1,fdsp=8", "data=x", "data=1,data=8", "tensor=0", ","])
def test_bad_mesh_string_is_explained(text):
  with pytest.raises(ValueError, match="--mesh"):
    parse_mesh(text)


def test_bad_mesh_via_command_line(capsys):
  assert parse_mesh("data=1, fsdp=-1,tensor=4") == {"data": 1, "fsdp": -1, "tensor": 4}
  assert plan_main([f"--gin_file={TINY_GIN}", "--mesh=data=1,fdsp=8"]) == 2
  assert "bad --mesh entry 'fdsp=8'" in capsys.readouterr().err
  assert plan_main([f"--gin_file={TINY_GIN}", "--devices=16", "--mesh=data=1,fsdp=4"]) == 2
  assert "16 devices" in capsys.readouterr().err
