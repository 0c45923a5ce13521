"""The trainer: configs, sharded steps, checkpoints with exact resume, metrics, preemption.

Training runs use a reduced ConvNeXt V2 (same code, one narrow block per stage) on the built-in
64 px sample so that compiling and running a few steps takes seconds on a 2-core CPU. The session
has 8 simulated CPU devices (conftest), so the meshes here are real 8-device meshes.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _env import REPO, cpu_env
from jax.sharding import PartitionSpec as P

from mmearth_jax import config_lib, metrics, train
from mmearth_jax import modalities as M
from mmearth_jax.parallel import mesh as mesh_lib

CONFIG = os.path.join(REPO, "configs", "mp_mae.py")

# In this process, a program compiled a second time (the reference run's config trained again) is
# loaded from JAX's persistent compilation cache rather than compiled again (conftest).
pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def tiny(data: str, *extra: str) -> list[str]:
  """Overrides for a seconds-to-compile MP-MAE on the 64 px sample (56 px crops, 8 px patches)."""
  return [f"data.path={data}", "model.depths=(1, 1, 1, 1)", "model.dims=(8, 16, 16, 16)",
          "model.decoder_dim=16", "data.global_batch_size=8", "data.read_threads=2",
          "train.num_steps=8", "train.log_every=1", "checkpoint.every_steps=4",
          "mesh.fsdp_min_size=64", "optimizer.base_lr=0.01", "optimizer.warmup_steps=2",
          "eval.every_steps=0", *extra]


def run(data: str, workdir, *extra: str, log=None) -> dict[int, dict]:
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(data, *extra))
  train.train(cfg, str(workdir), log=log or (lambda m: None))
  return metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def kill_after_checkpoint(proc: subprocess.Popen, workdir, timeout_s: float = 300) -> None:
  """SIGKILL `proc`'s process group once checkpoint 4 exists and step 6 is logged."""
  jsonl = workdir / "metrics.jsonl"
  deadline = time.monotonic() + timeout_s
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      if (workdir / "checkpoints" / "4").exists() and jsonl.exists() and \
          max(metrics.read_jsonl(str(jsonl)), default=0) >= 6:
        break
      time.sleep(0.05)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(rows: dict[int, dict]) -> dict[int, float]:
  return {s: r["loss"] for s, r in sorted(rows.items())}


def with_compilation_cache(env: dict, cache_dir) -> dict:
  """`env` with JAX's persistent compilation cache in `cache_dir` (every program, however quick
  to compile): a job's restart loads what its first launch compiled instead of compiling it
  again, as a restarted job with a compilation cache does. Give each test its own empty folder,
  so that the first launch compiles afresh."""
  return {**env, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


# ---------------------------------------------------------------------------------- configs


def test_every_paper_variant_loads_with_its_recipe():
  for model in ("atto", "tiny"):
    for data, crop, patch in (("", 112, 16), ("64", 56, 8), ("100k", 112, 16)):
      for ablation in ("", "_s2only", "_rgb", "_pixel", "_image", "_unweighted"):
        cfg = config_lib.load(f"{CONFIG}:{model}{data}{ablation}")
        assert (cfg.model.variant, cfg.data.crop, cfg.model.patch_size) == (model, crop, patch)
        # The paper's recipe.
        assert cfg.data.global_batch_size == 4096 and cfg.optimizer.base_lr == 1.5e-4
        assert (cfg.optimizer.b1, cfg.optimizer.b2, cfg.optimizer.weight_decay) == (0.9, 0.95, 0.05)
        assert (cfg.train.num_epochs, cfg.train.warmup_epochs) == (200, 40)
        assert cfg.objective.mask_ratio == 0.6 and cfg.objective.norm_pix
        outputs = M.resolve_outputs(cfg.data.outputs, M.resolve_input(cfg.data.input))
        expected = {"": 12, "_s2only": 1, "_rgb": 1, "_pixel": 6, "_image": 7, "_unweighted": 12}
        assert len(outputs) == expected[ablation]
        assert cfg.objective.aggregation == ("unweighted" if ablation == "_unweighted"
                                             else "uncertainty")
  demo = config_lib.load(f"{CONFIG}:demo")
  assert demo.model.variant == "atto" and demo.data.global_batch_size <= 16
  doc = config_lib._load_module(CONFIG).__doc__
  assert "mmearth-jax train --config configs/mp_mae.py:" in doc


def test_overrides_are_typed_and_misspellings_name_the_key():
  cfg = config_lib.load(f"{CONFIG}:atto", ["optimizer.base_lr=1", "model.dims=(8, 16, 32, 64)",
                                            "data.path=/x/y", "model.remat=True"])
  assert cfg.optimizer.base_lr == 1.0 and isinstance(cfg.optimizer.base_lr, float)
  assert tuple(cfg.model.dims) == (8, 16, 32, 64) and cfg.data.path == "/x/y" and cfg.model.remat
  with pytest.raises(config_lib.ConfigError, match=r"no key 'optimizer.base_lrr'.*optimizer.base_lr"):
    config_lib.load(f"{CONFIG}:atto", ["optimizer.base_lrr=1"])
  with pytest.raises(config_lib.ConfigError, match=r"train.num_steps='ten'.*int"):
    config_lib.load(f"{CONFIG}:atto", ["train.num_steps=ten"])
  with pytest.raises(config_lib.ConfigError, match=r"model.remat='1'.*bool"):
    config_lib.load(f"{CONFIG}:atto", ["model.remat=1"])
  with pytest.raises(config_lib.ConfigError, match="'mesh' is a section"):
    config_lib.load(f"{CONFIG}:atto", ["mesh=1"])
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'pico'"):
    config_lib.load(f"{CONFIG}:pico")
  assert config_lib.split_overrides(["train", "--config.a.b=1", "--config.c", "x", "--w", "d"]) \
      == (["train", "--w", "d"], ["a.b=1", "c=x"])


def test_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
  """The recipes ship in the package (mmearth_jax.configs maps onto configs/): by name, by the
  repository-relative path from another folder, and a user's own file starting from
  base_config() all load; an unknown name lists the shipped ones."""
  monkeypatch.chdir(tmp_path)  # no configs/ folder here
  want = config_lib.load(f"{CONFIG}:demo").to_dict()
  assert config_lib.load("mp_mae:demo").to_dict() == want
  assert config_lib.load("configs/mp_mae.py:demo").to_dict() == want
  assert {"mp_mae", "scale_mae", "gfm", "dense_contrastive", "segment"} <= set(
      config_lib.packaged_configs())
  (tmp_path / "mine.py").write_text(
      "from mmearth_jax import config_lib\n\n"
      "def get_config(variant):\n"
      "  c = config_lib.base_config()\n"
      "  c.seed = int(variant or 7)\n"
      "  return c\n")
  assert config_lib.load("mine.py:3").seed == 3
  with pytest.raises(config_lib.ConfigError, match=r"no config of that name.*mp_mae"):
    config_lib.load("mp_maee:demo")


def test_cli_reports_a_bad_override(tmp_path):
  env = cpu_env(1)
  out = subprocess.run([sys.executable, "-m", "mmearth_jax", "train", "--config",
                        f"{CONFIG}:demo", "--workdir", str(tmp_path), "--config.mesh.fdsp=2"],
                       env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2
  assert "no key 'mesh.fdsp'" in out.stderr and "mesh.fsdp" in out.stderr


# --------------------------------------------------------------------------- mesh and sharding


def test_mesh_axes_and_fsdp_rules():
  cfg = mesh_lib.default_config()
  cfg.fsdp = 4
  mesh = mesh_lib.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  params = {"enc": {"big": {"kernel": jnp.zeros((7, 7, 3, 256))},
                    "odd": {"kernel": jnp.zeros((3, 1001))},
                    "small": {"kernel": jnp.zeros((4, 8))}, "norm": {"scale": jnp.zeros(512)}}}
  specs = mesh_lib.param_specs(params, mesh, cfg.rules, min_size=256)
  assert specs["enc"]["big"]["kernel"] == P(None, None, None, "fsdp")  # largest divisible dim
  assert specs["enc"]["odd"]["kernel"] == P()  # no dimension divisible by 4
  assert specs["enc"]["small"]["kernel"] == P()  # under min_size
  assert specs["enc"]["norm"]["scale"] == P("fsdp")
  for bad in ({"data": 3, "fsdp": -1}, {"data": -1, "fsdp": -1}, {"data": 2, "fsdp": 2}):
    c = mesh_lib.default_config()
    c.update(bad)
    with pytest.raises(ValueError, match="config mesh"):
      mesh_lib.make_mesh(c)


def test_vit_tensor_parallel_rules_give_the_same_outputs():
  from mmearth_jax.models.vit import ViT
  model = ViT(patch_size=8, embed_dim=64, depth=2, num_heads=4)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  cfg = mesh_lib.default_config()
  cfg.update({"data": 2, "fsdp": 2, "tensor": 2})
  mesh = mesh_lib.make_mesh(cfg)
  specs = mesh_lib.param_specs(params, mesh, mesh_lib.VIT_TENSOR_RULES, min_size=1)
  blk = specs["blocks_0"]
  assert blk["attn"]["qkv"]["kernel"] == P("fsdp", "tensor")
  assert blk["attn"]["qkv"]["bias"] == P("tensor")
  assert blk["attn"]["proj"]["kernel"] == P("tensor", "fsdp")
  assert blk["mlp"]["fc2"]["kernel"] == P("tensor", "fsdp")
  shardings = mesh_lib.to_shardings(specs, mesh)
  sharded = jax.device_put(params, shardings)
  xs = jax.device_put(x, mesh_lib.batch_sharding(mesh))
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(sharded, xs)
  ref = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_remat_and_bfloat16_switches():
  from mmearth_jax.models.mp_mae import MPMAE
  from mmearth_jax.objectives.mp_mae import mp_mae_loss
  outputs = M.resolve_outputs("sentinel2,esa_worldcover,biome", M.S2_INPUT_BANDS)
  x = jax.random.normal(jax.random.key(0), (2, 56, 56, 12))
  kw = dict(outputs=outputs, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), patch_size=8,
            decoder_dim=16)
  params = jax.jit(MPMAE(**kw).init)(jax.random.key(1), x, jnp.zeros((2, 7, 7)))["params"]
  rng = np.random.default_rng(0)
  batch = {"image": x, "targets": {}, "valid": {}}
  for name, bands in outputs.items():
    m = M.get(name)
    if m.task == M.SEGMENTATION:
      t = rng.integers(0, m.num_classes, (2, 56, 56)).astype(np.int32)
      batch["targets"][name], batch["valid"][name] = t, t >= 0
    elif m.task == M.CLASSIFICATION:
      batch["targets"][name] = np.array([1, 3], np.int32)
      batch["valid"][name] = np.array([True, True])
    else:
      batch["targets"][name] = rng.normal(size=(2, 56, 56, len(bands))).astype(np.float32)
      batch["valid"][name] = np.ones((2, 56, 56, len(bands)), bool)

  def loss_fn(**over):
    model = MPMAE(**kw, **over)
    return jax.value_and_grad(lambda p: mp_mae_loss(model, p, batch, jax.random.key(2))[0])

  def grads(**over):
    return jax.jit(loss_fn(**over))(params)

  (l0, g0), (l1, g1) = grads(), grads(remat=True)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  l2, g2 = grads(dtype=jnp.bfloat16)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g2))  # float32 parameters
  assert abs(float(l2) - float(l0)) < 0.05 * abs(float(l0))
  # The matrix products run in bfloat16 (XLA:CPU may compute them in float32 internally, so the
  # program is checked rather than the value).
  text = str(jax.make_jaxpr(loss_fn(dtype=jnp.bfloat16))(params))
  dots = re.findall(r"(\w+)\[[\d,]*\] = dot_general", text)
  assert dots.count("bf16") > 10 and "f32" not in dots, dots


# ----------------------------------------------------------------------- checkpoints and resume


def test_metrics_jsonl_and_tensorboard(reference_run):
  workdir, rows = reference_run
  assert sorted(rows) == list(range(1, 13))
  row = rows[12]
  for name in M.ALL_OUTPUTS:
    assert np.isfinite(row[f"loss/{name}"]) and row[f"weight/{name}"] > 0
  for key in ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "gflops_per_step"):
    assert np.isfinite(row[key]) and row[key] > 0 or key == "lr"
  # The learned weights moved away from their initial 1, and the lr follows warmup + cosine.
  assert any(abs(row[f"weight/{n}"] - 1) > 1e-4 for n in M.ALL_OUTPUTS)
  lrs = [rows[s]["lr"] for s in range(1, 13)]
  assert lrs[0] == 0 and max(lrs) > 0 and lrs[-1] < max(lrs)
  events = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert events
  tags = set()
  from tensorboardX.proto import event_pb2
  for path in events:
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):  # TFRecord framing: length, crc, payload, crc
      n = int.from_bytes(data[pos:pos + 8], "little")
      ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      tags |= {v.tag for v in ev.summary.value}
      pos += 12 + n + 4
  assert {"loss", "lr", "grad_norm", "loss/sentinel2", "weight/biome", "images_per_s"} <= tags
  cfg = json.load(open(os.path.join(workdir, "config.json")))
  assert cfg["mesh"]["fsdp"] == 4


def test_fsdp_mesh_gives_the_single_device_losses(shards64, reference_run, tmp_path):
  _, ref = reference_run
  one = run(shards64, tmp_path, "train.num_steps=4", "mesh.num_devices=1")
  for s in range(1, 5):
    assert one[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5)


def test_resume_after_kill_9_repeats_the_uninterrupted_losses(shards64, reference_run, tmp_path):
  """A real process, killed with SIGKILL mid-run (perhaps mid-save), restarted: same losses.

  The first process compiles afresh (its steps must equal the in-process reference's bit for
  bit); the restart loads that compiled step from the compilation cache."""
  _, ref = reference_run
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "mmearth_jax", "train", "--config", f"{CONFIG}:demo",
         "--workdir", str(workdir), *[f"--config.{o}" for o in
                                      tiny(shards64, "train.num_steps=12", "mesh.fsdp=4")]]
  env = with_compilation_cache(cpu_env(8), tmp_path / "jax_cache")
  log = open(tmp_path / "first.log", "w+")
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  jsonl = workdir / "metrics.jsonl"
  kill_after_checkpoint(proc, workdir)
  log.seek(0)
  assert proc.returncode == -signal.SIGKILL, log.read()
  killed_at = max(metrics.read_jsonl(str(jsonl)))
  assert 6 <= killed_at < 12

  out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  resumed = int(out.stdout.split("resumed from ")[1].split()[0].rsplit("/", 1)[1])
  assert 4 <= resumed <= killed_at
  assert losses(metrics.read_jsonl(str(jsonl))) == losses(ref)  # bit-exact, every step


def _copy_checkpoints(src_workdir, dst_workdir, steps) -> None:
  for step in steps:
    shutil.copytree(os.path.join(src_workdir, "checkpoints", str(step)),
                    os.path.join(dst_workdir, "checkpoints", str(step)))


def test_restore_onto_a_smaller_mesh(shards64, reference_run, tmp_path):
  """Step 4 of the 8-device run (data 2 x fsdp 4) continues on 4 devices (fsdp 4)."""
  ref_dir, ref = reference_run
  _copy_checkpoints(ref_dir, tmp_path, [4])
  lines = []
  rows = run(shards64, tmp_path, "train.num_steps=12", "mesh.fsdp=4", "mesh.num_devices=4",
             log=lines.append)
  assert any("resumed from" in l and l.endswith("/4") for l in lines), lines
  assert any("'data': 1, 'fsdp': 4" in l for l in lines), lines
  assert sorted(rows) == list(range(5, 13))
  for s in range(5, 13):
    assert rows[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(shards64, reference_run,
                                                                   tmp_path):
  ref_dir, ref = reference_run
  _copy_checkpoints(ref_dir, tmp_path, [4, 8, 12])
  ckpts = tmp_path / "checkpoints"
  # Corrupt step 12: every stored array chunk truncated, as a failing disk or a torn copy would.
  chunks = [p for p in glob.glob(str(ckpts / "12" / "state" / "**" / "*"), recursive=True)
            if os.path.isfile(p) and "/d/" in p]
  assert chunks
  for p in chunks:
    with open(p, "r+b") as f:
      f.truncate(max(os.path.getsize(p) // 3, 1))
  # And a half-written step 16 that Orbax never committed (its temporary name).
  os.makedirs(ckpts / "16.orbax-checkpoint-tmp-1234" / "state")
  lines = []
  rows = run(shards64, tmp_path, "train.num_steps=12", "mesh.fsdp=4", log=lines.append)
  text = "\n".join(lines)
  assert "checkpoints/12 is unreadable" in text and "resumed from" in text, text
  assert text.split("resumed from ")[1].split()[0].endswith("/8")
  assert os.path.isdir(str(ckpts) + "_unreadable/12")  # kept for inspection, not deleted
  assert sorted(rows) == [9, 10, 11, 12]
  for s in range(9, 13):
    assert rows[s]["loss"] == ref[s]["loss"]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(shards64, tmp_path):
  # One device: what is checked is the loop's guard and its checkpoints, not the sharding.
  with pytest.raises(train.TrainingError, match=r"non-finite loss at step (\d+)") as err:
    run(shards64, tmp_path, "train.num_steps=40", "checkpoint.every_steps=2",
        "optimizer.base_lr=1e12", "optimizer.warmup_steps=4", "mesh.num_devices=1")
  step = int(err.value.args[0].split("non-finite loss at step ")[1].split()[0])
  msg = err.value.args[0]
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps and steps[-1] < step and f"checkpoints/{steps[-1]}" in msg
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(steps[-1]) / "state")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_sigterm_saves_a_checkpoint_and_exits(shards64, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "mmearth_jax", "train", "--config", f"{CONFIG}:demo",
         "--workdir", str(workdir), *[f"--config.{o}" for o in
                                      tiny(shards64, "train.num_steps=100000",
                                           "checkpoint.every_steps=100000",
                                           # the signal path, not the sharding, is checked
                                           "mesh.num_devices=1")]]
  proc = subprocess.Popen(cmd, env=cpu_env(8), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  jsonl = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if jsonl.exists() and max(metrics.read_jsonl(str(jsonl)), default=0) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted (SIGTERM): saved step" in out
  saved = int(out.split("saved step ")[1].split()[0])
  assert saved >= 3 and (workdir / "checkpoints" / str(saved) / "commit_success.txt").exists() \
      or (workdir / "checkpoints" / str(saved) / "_CHECKPOINT_METADATA").exists()
