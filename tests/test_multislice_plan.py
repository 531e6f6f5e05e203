"""Multislice plans: the collectives of a compiled step read from its HLO text (replica-group
spellings, loop trip counts, libtpu's megascale sends), which of them cross slices (DCN) on fake
CPU devices cut into two slices, and `pretrainx plan --topology=... --num_slices=N`."""

import json

import pytest

from pretrainx import hlo_collectives as hc
from pretrainx import topology

pytestmark = pytest.mark.xdist_group("plan")


class Dev:
  def __init__(self, i):
    self.id = i


def _groups(attr):
  return hc.replica_groups(attr, 8)


def test_explicit_iota_and_mesh_replica_groups():
  assert _groups("replica_groups={{0,1},{2,3}}, to_apply=%add") == [[0, 1], [2, 3]]
  assert _groups("replica_groups={}, to_apply=%add") == [list(range(8))]
  assert _groups("replica_groups=[2,4]<=[8], dimensions={0}") == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert _groups("replica_groups=[4,2]<=[2,4]T(1,0), x=1") == [[0, 4], [1, 5], [2, 6], [3, 7]]
  mesh = "replica_groups=mesh['data'=2,'fsdp'=4,'context'=1,'expert'=1,'tensor'=1] {%s}, x=1"
  assert _groups(mesh % "'fsdp'") == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert _groups(mesh % "'data'") == [[0, 4], [1, 5], [2, 6], [3, 7]]
  assert _groups(mesh % "'data','fsdp'") == [list(range(8))]
  assert _groups("replica_groups=mesh['a'=8] {'a':(2)2}") == [[0, 2], [1, 3], [4, 6], [5, 7]]
  assert _groups("replica_groups=mesh['a'=2,'b'=4], device_ids=([2,4]<=[4,2]T(1,0)) {'a'}"
                 ) == [[0, 1], [2, 3], [4, 5], [6, 7]]
  assert _groups("source_target_pairs={{0,4},{4,0}}, x=1") == [[0, 4], [4, 0]]


HLO = """HloModule m, num_partitions=8

%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %x = f32[16]{0} get-tuple-element(%p), index=1
  %ag = f32[64]{0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ars = f32[16]{0} all-reduce-start(%x), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %ard)
}

%branch (q: bf16[8,4]) -> bf16[32,4] {
  %q = bf16[8,4]{1,0} parameter(0)
  ROOT %rs = bf16[2,4]{1,0} reduce-scatter(%q), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, to_apply=%add
}

%cond (c: (s32[], f32[16])) -> pred[] {
  %k80 = s32[]{:T(128)} constant(80)
  %c = (s32[], f32[16]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %k80), direction=LT
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %one = s32[] constant(1)
  %start = s32[] copy(%one)
  %t1 = (s32[], f32[16]{0}) tuple(%start, %a)
  %peeled = (s32[], f32[16]{0}) while(%t1), condition=%cond, body=%body
  %w = (s32[], f32[16]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"80"}}
  %c = bf16[2,4]{1,0} conditional(%k, %a, %a), branch_computations={%branch, %branch}
  %cp = f32[16]{0} collective-permute(%a), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %s = (f32[4,128]{1,0:T(4,128)}, u32[], token[]) send(%a, %aa), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE",_xla_megascale_target="{1,2}x{0:3}"}
  ROOT %r = f32[16]{0} add(%a, %a)
}
"""


def test_trip_counts_async_pairs_branches_and_megascale_sends():
  """A while body runs known_trip_count times (CPU), or `i < 80` from its condition with i from
  1 (libtpu's peeled layer loop: 79 runs); an async start/done pair counts once (its bytes
  from the -done, its groups from the -start); each conditional branch once; a megascale send
  is a DCN collective even though the program is one slice's."""
  slices = {i: i // 4 for i in range(8)}
  out = hc.traffic(HLO, [Dev(i) for i in range(8)], slices)
  assert out["ici"] == {"all-gather": {"count": 159, "bytes": 159 * 256},
                        "reduce-scatter": {"count": 2, "bytes": 2 * 16 * 4},
                        "collective-permute": {"count": 1, "bytes": 64}}
  # the all-reduce pairs i with i+4 (another slice); the send's first buffer is 4x128 f32
  assert out["dcn"] == {"all-reduce": {"count": 159 + 1, "bytes": 159 * 64 + 2048}}
  # a one-slice program (num_partitions below the devices): its own collectives stay in ICI
  one = hc.traffic(HLO.replace("num_partitions=8", "num_partitions=4"),
                   [Dev(i) for i in range(8)], slices)
  assert one["dcn"] == {"all-reduce": {"count": 1, "bytes": 2048}}


def test_fake_cpu_two_slices_only_data_collectives_cross(tiny_exp):
  """dcn_data=2 x fsdp=4 on 8 CPU devices: the gradient all-reduce over data crosses the two
  simulated slices; every FSDP all-gather stays within one."""
  import jax
  from pretrainx.plan import abstract_batch
  from pretrainx.sharding import mesh_slices
  from pretrainx.train.runtime import build_runtime

  exp = tiny_exp(mesh={"dcn_data": 2, "data": 1, "fsdp": 4}, model={"scan_unroll": 1})
  rt = build_runtime(exp)
  devices = list(rt.mesh.devices.flat)
  slice_of = mesh_slices(rt.mesh, 2)
  assert sorted(slice_of.values()) == [0] * 4 + [1] * 4
  with rt.scope():
    text = rt.train_step.lower(rt.abstract_state, abstract_batch(rt.exp, rt.mesh)
                               ).compile().as_text()
  out = hc.traffic(text, devices, slice_of)
  assert set(out["dcn"]) == {"all-reduce"} and out["dcn"]["all-reduce"]["bytes"] > 0
  assert "all-gather" in out["ici"]
  for c in hc.collectives(text):
    groups = hc.replica_groups(c["rest"], len(devices))
    spans = {len({slice_of[devices[i].id] for i in g}) for g in groups}
    if c["kind"] == "all-gather":
      assert spans == {1}, c["name"]
  assert json.dumps(out)  # what plan --json carries


@pytest.fixture
def plan_cli(run_cli):
  return lambda *args: run_cli("plan", *args)


@pytest.mark.parametrize("n", ["0", "300"])
def test_bad_num_slices_is_one_line(plan_cli, n):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-256", f"--num_slices={n}")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"pretrainx plan: error: --num_slices={n} for v5p-256: a slice count is an integer from 1 "
      "to 256 (at most 256 slices and 65536 chips in all)."]


def test_dcn_product_must_equal_num_slices(plan_cli):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--devices=8", "--num_slices=2",
                 "--gin_param=MeshConfig.dcn_fsdp=4")
  assert out.returncode == 2
  assert len(out.stderr.strip().splitlines()) == 1
  assert "dcn_data x dcn_fsdp = 1 x 4 = 4 slices, but the plan is for 2" in out.stderr


@pytest.mark.skipif(not topology.libtpu_available(), reason="needs libtpu (the tpu extra)")
def test_two_v5p_slices_compile_and_only_gradient_reductions_cross_dcn(plan_cli):
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8", "--num_slices=2",
                 "--mesh=data=1,fsdp=4", "--json")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout)
  assert report["devices"] == 8 and report["num_slices"] == 2
  assert report["mesh"]["data"] == 2 and report["mesh"]["fsdp"] == 4
  dcn = report["collectives"]["dcn"]
  assert set(dcn) <= {"all-reduce", "reduce-scatter"} and dcn
  assert all(v["bytes"] > 0 for v in dcn.values())
  assert report["collectives"]["ici"]["all-gather"]["count"] > 0  # FSDP gathers, within slices


@pytest.mark.skipif(not topology.libtpu_available(), reason="needs libtpu (the tpu extra)")
def test_a_step_the_tpu_compiler_cannot_fit_is_one_line_and_exit_1(plan_cli):
  """64k-token sequences with materialised attention scores need ~400 GiB per v5p device: the
  compiler refuses them, and plan says so in one line (exit 1, 'does not fit'), no traceback."""
  out = plan_cli("--gin_file=gin_configs/tiny.gin", "--topology=v5p-8",
                 "--gin_param=RunConfig.seq_len=65536", "--gin_param=ModelConfig.max_seq_len=65536",
                 "--gin_param=RunConfig.global_batch_size=8")
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("pretrainx plan: does not fit: "), lines
  assert "exceeds available HBM" in lines[0] and "v5p-8" in lines[0], lines
