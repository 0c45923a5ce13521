"""The trainer as a multi-host job: two real `jax.distributed` processes started by
`launch/local.sh`, killed with SIGKILL and restarted, against the single-process run.

In its own file so that the test runner can run it beside the rest of test_train.py (it takes
the longest of the suite).
"""
import os
import signal
import subprocess
import sys

import pytest
from _env import REPO, cpu_env
from test_train import CONFIG, kill_after_checkpoint, losses, tiny

from mmearth_jax import metrics

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def test_two_processes_train_die_resume_and_match_one_process(shards64, reference_run, tmp_path):
  """launch/local.sh starts 2 real jax.distributed processes (gloo, 4 CPU devices each) forming
  the reference run's 8-device mesh; both are killed with SIGKILL after a checkpoint, restarted,
  and the job's per-step losses match the single-process 8-device run's."""
  import portpicker
  _, ref = reference_run
  workdir = tmp_path / "run"
  args = ["--config", f"{CONFIG}:demo", "--workdir", str(workdir),
          *[f"--config.{o}" for o in tiny(shards64, "train.num_steps=12", "mesh.fsdp=4")]]

  def launch(log_name):
    env = cpu_env(4)
    env.update(NUM_PROCESSES="2", DEVICES_PER_PROCESS="4", LOG_DIR=str(tmp_path),
               PORT=str(portpicker.pick_unused_port()), MMEARTH_JAX=f"{sys.executable} -m mmearth_jax")
    log = open(tmp_path / log_name, "w+")
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), *args], env=env,
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log

  def logs(log):
    log.seek(0)
    other = tmp_path / "process_1.log"
    return log.read() + "\n--- process 1 ---\n" + (other.read_text() if other.exists() else "")

  jsonl = workdir / "metrics.jsonl"
  proc, log = launch("first.log")
  kill_after_checkpoint(proc, workdir)
  assert jsonl.exists() and max(metrics.read_jsonl(str(jsonl))) >= 6, logs(log)
  assert max(metrics.read_jsonl(str(jsonl))) < 12, logs(log)

  proc, log = launch("second.log")
  try:
    proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  text = logs(log)
  assert proc.returncode == 0, text
  assert "resumed from" in text and "'data': 2, 'fsdp': 4" in text, text
  got = losses(metrics.read_jsonl(str(jsonl)))
  assert sorted(got) == sorted(losses(ref))
  for s, value in losses(ref).items():
    assert got[s] == pytest.approx(value, rel=1e-5), (s, got[s], value)
