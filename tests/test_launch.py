"""Multi-process start-up: where the coordinator comes from, and the launch scripts' checks and
install lines."""
import ast
import os
import re
import subprocess

import pytest
from _env import REPO

from mmearth_jax.parallel.distributed import plan

EXPLICIT = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}


def test_single_process_needs_nothing():
  assert plan(env={}) is None
  assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: no runtime
  assert plan(env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM


def test_explicit_coordinator_from_flags_or_environment():
  assert plan("10.0.0.1:1234", 4, 2, env={}) == EXPLICIT
  env = {"MMEARTH_COORDINATOR": "10.0.0.1:1234", "MMEARTH_NUM_PROCESSES": "4",
         "MMEARTH_PROCESS_ID": "2"}
  assert plan(env=env) == EXPLICIT
  assert plan(process_id=3, env=env)["process_id"] == 3  # a flag wins over the environment
  with pytest.raises(ValueError, match="MMEARTH_PROCESS_ID"):
    plan(env={"MMEARTH_COORDINATOR": "h:1", "MMEARTH_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="HOST:PORT"):
    plan("h", 2, 0, env={})
  with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
    plan("h:1", 2, 2, env={})
  with pytest.raises(ValueError, match="MMEARTH_NUM_PROCESSES='two'"):
    plan(env={"MMEARTH_COORDINATOR": "h:1", "MMEARTH_NUM_PROCESSES": "two"})


def test_clusters_are_left_to_jax_auto_detection():
  assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
  assert plan(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}


@pytest.mark.parametrize("script,env,message", [
    ("local.sh", {}, "NUM_PROCESSES"),
    ("local.sh", {"NUM_PROCESSES": "two"}, "not a positive integer"),
    ("local.sh", {"NUM_PROCESSES": "2"}, "pass the train arguments"),
    ("slurm_gpu.sbatch", {}, "CONFIG"),
    ("slurm_gpu.sbatch", {"CONFIG": "configs/mp_mae.py:atto"}, "WORKDIR"),
    ("slurm_gpu.sbatch", {"CONFIG": "c", "WORKDIR": "w"}, "submit it with sbatch"),
    ("tpu_pod.sh", {}, "TPU_NAME"),
    ("tpu_pod.sh", {"TPU_NAME": "t", "ZONE": "z", "ACCELERATOR_TYPE": "v4-8"}, "PROJECT"),
    ("tpu_pod.sh", {"TPU_NAME": "t", "ZONE": "z", "ACCELERATOR_TYPE": "v4-8", "PROJECT": "p"},
     "pass the train arguments"),
])
def test_launchers_fail_early_naming_what_is_missing(script, env, message):
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script)],
                       env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True,
                       timeout=30)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr


def _extras() -> set[str]:
  """The keys of setup.py's extras_require, read from its source."""
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") ==
              "setup")
  (extras,) = [k.value for k in call.keywords if k.arg == "extras_require"]
  return {k.value for k in extras.keys}


@pytest.mark.parametrize("script", ["local.sh", "slurm_gpu.sbatch", "tpu_pod.sh"])
def test_launchers_install_through_the_extras(script):
  """No launcher pins JAX by hand: they install the package with its `tpu` / `cuda12` extra
  (setup.py keeps the one JAX range), and every extra they name exists."""
  text = open(os.path.join(REPO, "launch", script)).read()
  pinned = re.search(r"(?<![\w-])jax(\[|[<>=~])", text)  # jax[tpu], jax>=..; not mmearth_jax[..]
  assert not pinned, f"{script} names a JAX build or version itself"
  named = set(re.findall(r"\[([a-z0-9_,]+)\]'", text))
  assert named, f"{script} names no extra to install with"
  assert {e for n in named for e in n.split(",")} <= _extras(), named
  if script == "tpu_pod.sh":
    assert "python3 -m pip install -q -U -e './mmearth_jax[tpu]'" in text
  if script == "slurm_gpu.sbatch":
    assert "[cuda12]'" in text
