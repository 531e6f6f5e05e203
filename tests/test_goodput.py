"""Goodput accounting (pretrainx/train/goodput.py): synthetic goodput.jsonl timelines with known
numbers, summarized; the recorder writing one; and `pretrainx goodput` in and out of errors."""

import json

import pytest

from pretrainx.train import goodput

T0 = 1_700_000_000.0


def _write(run_dir, events, tail=""):
  run_dir.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(e) + "\n" for e in events) + tail
  (run_dir / goodput.GOODPUT_FILE).write_text(text)
  return str(run_dir)


def _ev(event, attempt, t, **fields):
  return {"event": event, "attempt": attempt, "t": T0 + t, **fields}


def _clean_run(attempt=1, offset=0.0):
  """100 s: 10 startup, 5 compile (step 1), 60 of steps 1..100, a 4 s local and 6 s persistent
  checkpoint, 5 s eval, 10 s unaccounted."""
  o = offset
  return [
      _ev("attempt", attempt, o + 0.5, job_start=T0 + o),
      _ev("started", attempt, o + 10, step=0, tier=None),
      _ev("compiled", attempt, o + 15, step=1, seconds=5.0),
      _ev("steps", attempt, o + 45, first=1, last=50, seconds=30.0),
      _ev("blocked", attempt, o + 49, kind="checkpoint_local", step=50, seconds=4.0),
      _ev("blocked", attempt, o + 55, kind="checkpoint_persistent", step=50, seconds=6.0),
      _ev("steps", attempt, o + 85, first=50, last=100, seconds=30.0),
      _ev("blocked", attempt, o + 90, kind="eval", step=100, seconds=5.0),
      _ev("ended", attempt, o + 100, step=100, how="finished"),
  ]


def test_a_clean_run(tmp_path):
  d = goodput.summarize(_write(tmp_path / "run", _clean_run()))
  assert d["status"] == "finished"
  assert d["total_s"] == pytest.approx(100.0)
  assert d["productive_s"] == pytest.approx(60.0)
  assert d["goodput_percent"] == pytest.approx(60.0)
  b = d["badput_s"]
  assert (b["startup"], b["compile"], b["eval"]) == pytest.approx((10.0, 5.0, 5.0))
  assert (b["checkpoint_local"], b["checkpoint_persistent"]) == pytest.approx((4.0, 6.0))
  assert b["recomputed"] == b["restart_gap"] == b["restore"] == 0
  assert b["other"] == pytest.approx(10.0)
  assert d["recomputed_steps"] == 0 and d["productive_steps"] == 99
  assert d["attempts"][0]["last_step"] == 100


def _restarted_run():
  """Attempt 1 checkpoints at 50, reaches 80 (30 s on steps 51..80 in a window 50..80) and is
  killed at t=100 with no `ended`; attempt 2 starts at t=130, restores step 50 from the
  persistent tier in 8 s, is ready at t=145, recomputes 51..80 and finishes 100."""
  return [
      _ev("attempt", 1, 0.5, job_start=T0),
      _ev("started", 1, 10, step=0, tier=None),
      _ev("steps", 1, 60, first=0, last=50, seconds=50.0),
      _ev("blocked", 1, 65, kind="checkpoint_persistent", step=50, seconds=5.0),
      _ev("steps", 1, 95, first=50, last=80, seconds=30.0),
      _ev("attempt", 2, 130.5, job_start=T0 + 130),
      _ev("restored", 2, 143, step=50, tier="persistent", seconds=8.0),
      _ev("started", 2, 145, step=50, tier="persistent"),
      _ev("compiled", 2, 150, step=51, seconds=5.0),
      _ev("steps", 2, 199, first=51, last=100, seconds=49.0),
      _ev("ended", 2, 200, step=100, how="finished"),
  ]


def test_a_restart_moves_the_recomputed_steps_time_to_wasted(tmp_path):
  d = goodput.summarize(_write(tmp_path / "run", _restarted_run()))
  b = d["badput_s"]
  assert d["total_s"] == pytest.approx(200.0)
  assert d["recomputed_steps"] == 30  # 51..80
  assert b["recomputed"] == pytest.approx(30.0)
  assert d["productive_s"] == pytest.approx(50.0 + 49.0)
  assert d["goodput_percent"] == pytest.approx(49.5)
  assert b["restart_gap"] == pytest.approx(35.0)  # last event t=95 -> job start t=130
  assert b["restore"] == pytest.approx(8.0)
  assert d["restore_by_tier_s"] == {"persistent": pytest.approx(8.0)}
  assert b["startup"] == pytest.approx(10.0 + (15.0 - 8.0))
  assert b["other"] == pytest.approx(200 - 99 - 30 - 35 - 8 - 17 - 5 - 5)
  assert [a["how"] for a in d["attempts"]] == [None, "finished"]
  assert d["status"] == "finished"


def test_a_restore_inside_a_window_wastes_its_share(tmp_path):
  """A window 0..40 (40 s) cut at step 30 by a rollback loses 10 steps and 10 s."""
  events = [_ev("attempt", 1, 0, job_start=T0), _ev("started", 1, 1, step=0, tier=None),
            _ev("steps", 1, 41, first=0, last=40, seconds=40.0),
            _ev("restored", 1, 42, step=30, tier="local", seconds=1.0),
            _ev("started", 1, 43, step=30, tier="local"),
            _ev("steps", 1, 53, first=30, last=40, seconds=10.0),
            _ev("ended", 1, 54, step=40, how="finished")]
  d = goodput.summarize(_write(tmp_path / "run", events))
  assert d["recomputed_steps"] == 10
  assert d["badput_s"]["recomputed"] == pytest.approx(10.0)
  assert d["productive_s"] == pytest.approx(40.0)
  assert d["badput_s"]["startup"] == pytest.approx(1.0)  # the rollback's restore is not startup


def test_a_running_run_is_summarized_to_its_last_event(tmp_path):
  d = goodput.summarize(_write(tmp_path / "run", _clean_run()[:4]))
  assert d["status"] == "running"
  assert d["total_s"] == pytest.approx(45.0)
  assert d["goodput_percent"] == pytest.approx(100 * 30 / 45)
  assert "running, up to its last event" in goodput.format_summary(d)


def test_a_torn_last_line_is_skipped(tmp_path):
  run = _write(tmp_path / "run", _clean_run()[:-1], tail='{"event": "ended", "attem')
  d = goodput.summarize(run)
  assert d["torn_lines"] == 1 and d["status"] == "running"
  assert d["total_s"] == pytest.approx(90.0)


def test_the_recorder_writes_a_timeline_that_summarizes(tmp_path):
  clock = iter([T0 + t for t in (1, 10, 12, 20, 22, 23, 40,  # attempt 1
                                 55, 60, 61, 63, 70)])  # attempt 2
  now = lambda: next(clock)  # noqa: E731
  run = str(tmp_path / "run")
  rec = goodput.GoodputRecorder(run, enabled=True, job_start=T0, clock=now)
  rec.started(0, None)
  rec.compiled(2.0, step=1)
  rec.steps(1, 10, 8.0)
  rec.blocked("checkpoint_local", 2.0, step=10)
  rec.steps(10, 15, 1.0)
  m = rec.metrics()  # at t=40
  assert m["goodput/percent"] == pytest.approx(100 * 9 / 40)
  assert m["goodput/badput/checkpoint_local_s"] == pytest.approx(2.0)
  rec.close()  # killed: no `ended`
  with open(tmp_path / "run" / goodput.GOODPUT_FILE, "a", encoding="utf-8") as f:
    f.write('{"event": "steps", "att')  # torn by the kill
  rec = goodput.GoodputRecorder(run, enabled=True, job_start=T0 + 50, clock=now)
  assert rec.attempt == 2
  rec.restored(10, "local", 3.0)
  rec.started(10, "local")
  rec.steps(10, 20, 7.0)
  rec.ended(20, "finished")
  rec.close()
  d = goodput.summarize(run)
  assert d["attempts"][1]["job_start"] == T0 + 50
  assert d["total_s"] == pytest.approx(70.0)
  assert d["recomputed_steps"] == 5 and d["badput_s"]["recomputed"] == pytest.approx(1.0)
  assert d["productive_s"] == pytest.approx(8.0 + 7.0)
  assert d["badput_s"]["restart_gap"] == pytest.approx(50.0 - 23.0)  # its last event -> restart
  assert d["badput_s"]["startup"] == pytest.approx(10.0 + (61 - 50 - 3))
  assert d["torn_lines"] == 1


def test_a_disabled_recorder_writes_nothing(tmp_path):
  rec = goodput.GoodputRecorder(str(tmp_path / "run"), enabled=False, job_start=T0)
  rec.started(0, None)
  rec.steps(0, 5, 1.0)
  assert rec.metrics() == {}
  rec.close()
  assert not (tmp_path / "run").exists()


def test_the_recorder_refuses_unknown_names(tmp_path):
  rec = goodput.GoodputRecorder(str(tmp_path / "run"), enabled=True, job_start=T0)
  for bad in (lambda: rec.started(0, "disk"), lambda: rec.ended(1, "done"),
              lambda: rec.blocked("Eval", 1.0, 0), lambda: rec.blocked("restore", 1.0, 0)):
    with pytest.raises(ValueError):
      bad()
  rec.close()


def test_the_cli_prints_the_table_and_json(tmp_path, run_cli):
  run = _write(tmp_path / "run", _restarted_run())
  out = run_cli("goodput", f"--run_dir={run}")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith(f"goodput 49.5% of {run} (finished; 2 attempts)")
  assert "wasted (recomputed after restore): 30 steps" in out.stdout
  assert "restore from checkpoint (persistent 8.0 s)" in out.stdout
  out = run_cli("goodput", f"--run_dir={run}", "--json")
  assert out.returncode == 0
  assert json.loads(out.stdout)["recomputed_steps"] == 30


@pytest.mark.parametrize("make", ["missing_dir", "no_file"])
def test_the_cli_says_when_there_is_no_record(tmp_path, run_cli, make):
  run = tmp_path / "run"
  if make == "no_file":
    run.mkdir()
  out = run_cli("goodput", f"--run_dir={run}")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      f"pretrainx goodput: error: {run}/goodput.jsonl does not exist or is empty: no goodput was "
      "recorded there (is --run_dir a training run's directory?)."]


def test_a_run_in_a_bucket(gcs_dir, run_cli):
  """Two attempts recorded in gs:// (appended as part objects, the second after a pull), read
  back by summarize and the CLI."""
  clock = iter([T0 + t for t in (1, 5, 15, 16, 30, 31, 40)])
  now = lambda: next(clock)  # noqa: E731
  rec = goodput.GoodputRecorder(gcs_dir, enabled=True, job_start=T0, clock=now)
  rec.started(0, None)
  rec.steps(0, 10, 10.0)
  rec.close()  # no `ended`: preempted without a word
  rec = goodput.GoodputRecorder(gcs_dir, enabled=True, job_start=T0 + 20, clock=now)
  assert rec.attempt == 2
  rec.started(10, "persistent")
  rec.steps(10, 20, 9.0)
  rec.ended(20, "finished")
  rec.close()
  d = goodput.summarize(gcs_dir)
  assert [a["attempt"] for a in d["attempts"]] == [1, 2]
  assert d["total_s"] == pytest.approx(40.0) and d["productive_s"] == pytest.approx(19.0)
  assert d["badput_s"]["restart_gap"] == pytest.approx(20.0 - 15.0)
  out = run_cli("goodput", f"--run_dir={gcs_dir}")
  assert out.returncode == 0, out.stderr
  assert "(finished; 2 attempts)" in out.stdout
