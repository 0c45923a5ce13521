"""Shared fixtures: small built-in samples and their converted shards, made once per session."""
import os
import re
import shutil

# Before jax is imported anywhere: 8 simulated CPU devices, so sharding runs on a real mesh.
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                  os.environ.get("XLA_FLAGS", "")) +
                           " --xla_force_host_platform_device_count=8"
                           # Quicker compiles (about a fifth of the suite's CPU time, measured on
                           # 2 cores) for programs that run only a few steps; the same numbers to
                           # the tests' tolerances. Subprocesses inherit these flags.
                           " --xla_backend_optimization_level=1"
                           " --xla_llvm_disable_expensive_passes=true"
                           # The older loop-fusion code generator: a third less compile time
                           # (4.8 -> 3.2 s for a small MP-MAE gradient), a quarter slower to run
                           # (63 -> 77 ms); most test programs run a few steps, so the suite gains.
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_compilation_cache() -> str:
  """One folder for JAX's persistent compilation cache, shared by the xdist workers of this run
  and every subprocess they start (both inherit this process's environment): a program that
  several tests, modules or processes compile (the small training configs of test_train,
  test_eval_train and the CLI tests; both ranks of a multi-process run) compiles once per run.
  What runs is the same executable either way. Fresh for each run, so no test depends on an
  earlier one; the process that made it removes it at the end."""
  if "MMEARTH_TEST_CACHE_DIR" not in os.environ:  # the pytest main process
    import tempfile
    os.environ["MMEARTH_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmearth_jax_test_cache_")
    os.environ["MMEARTH_TEST_CACHE_OWNER"] = str(os.getpid())
  return os.environ["MMEARTH_TEST_CACHE_DIR"]


os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_compilation_cache()
# Cache every compile that takes a measurable time (the default skips those under a second).
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
# A size limit turns on the cache's file lock, so no process reads an entry another is writing.
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 * 2 ** 30)

import pytest  # noqa: E402

from mmearth_jax.data import convert, synth  # noqa: E402

# The files that take longest, longest first (measured with --durations=0 on 2 cores). `make test`
# hands whole files to its 2 workers in collection order (--dist loadfile
# --no-loadscope-reorder), so starting these first lets both workers finish together instead of
# one running a long file alone at the end.
LONGEST_FIRST = ("test_train.py", "test_eval_train.py", "test_mp_mae.py", "test_train_multiprocess.py",
                 "test_convnextv2.py", "test_convnextv2_parity.py", "test_dense_contrastive.py",
                 "test_scale_mae_train.py", "test_scale_mae.py", "test_scenes.py", "test_gfm.py",
                 "test_notebook.py", "test_interop_layouts.py", "test_segmentation.py",
                 "test_ops.py", "test_scale_mae_parity.py", "test_cards.py", "test_eval.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def sample64(tmp_path_factory):
  """48 tiles of 64 px in the upstream layout."""
  folder = str(tmp_path_factory.mktemp("sample64"))
  synth.write_sample(folder, n=48, size=64, seed=0)
  return folder


@pytest.fixture(scope="session")
def shards64(sample64, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shards64"))
  convert.convert(sample64, out, shards=3, log=lambda *a: None)
  return out


@pytest.fixture(scope="session")
def sample128(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("sample128"))
  synth.write_sample(folder, n=8, size=128, seed=1)
  return folder


@pytest.fixture(scope="session")
def shards128(sample128, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("shards128"))
  convert.convert(sample128, out, shards=2, log=lambda *a: None)
  return out


def pytest_unconfigure(config):
  if os.environ.get("MMEARTH_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["MMEARTH_TEST_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def jax_compilation_cache():
  """The session's persistent compilation cache folder (set up above, before JAX is imported)."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def shared_path(tmp_path_factory, name: str):
  """A path common to all xdist workers of this run (the session's temp folder without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, jax_compilation_cache):
  """12 uninterrupted steps of test_train's small MP-MAE on the 8-device mesh data=2 x fsdp=4,
  on 48 tiles of 64 px: the run that the resume, mesh and multi-process tests must repeat.
  Made once per test run by the first worker that asks (another waits for it); same machine,
  same program, so the same bits as a run of its own. Returns (workdir, rows by step)."""
  from filelock import FileLock
  from test_train import run

  from mmearth_jax import metrics
  root = shared_path(tmp_path_factory, "reference_run")
  workdir = root / "run"
  with FileLock(str(root) + ".lock"):
    if not (root / "done").exists():
      shutil.rmtree(root, ignore_errors=True)  # a run that failed half-way
      synth.write_sample(str(root / "h5"), n=48, size=64, seed=0)  # as `sample64`
      convert.convert(str(root / "h5"), str(root / "shards"), shards=3, log=lambda *a: None)
      run(str(root / "shards"), workdir, "train.num_steps=12", "mesh.fsdp=4")
      (root / "done").write_text("")
  return workdir, metrics.read_jsonl(str(workdir / "metrics.jsonl"))
