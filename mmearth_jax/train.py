"""The training loop, read top to bottom: mesh -> data -> model and objective -> sharded state
-> jitted step -> loop with metrics, checkpoints and preemption.

The same code runs on one CPU, a multi-GPU SLURM job or a TPU pod: each process feeds its slice
of the global batch, and `jax.jit` with named shardings does the rest. Per-step randomness is
`fold_in(rng, step)`, and the Grain iterator position is checkpointed beside the state, so a
resumed run repeats the uninterrupted run's steps exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmearth_jax import checkpoint as ckpt_lib
from mmearth_jax import metrics as metrics_lib
from mmearth_jax import optim
from mmearth_jax import pretrained
from mmearth_jax.data import convert, pipeline
from mmearth_jax.data import modalities as M
from mmearth_jax.eval import evaluate as eval_lib
from mmearth_jax.models import gfm as gfm_model
from mmearth_jax.models.dense_contrastive import DenseContrastive
from mmearth_jax.models.dense_contrastive import init_params as dense_contrastive_init
from mmearth_jax.models.mp_mae import MPMAE
from mmearth_jax.models.scale_mae import ScaleMAE
from mmearth_jax.models.vit import VIT_VARIANTS
from mmearth_jax.objectives.dense_contrastive import dense_contrastive_loss, objective_kwargs
from mmearth_jax.objectives.gfm import gfm_loss
from mmearth_jax.objectives.mp_mae import mp_mae_loss
from mmearth_jax.objectives.scale_mae import scale_mae_loss
from mmearth_jax.parallel import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainingError(RuntimeError):
  pass


def default_config() -> ml_collections.ConfigDict:
  """Sections every training config has; a config file fills in method, model and objective."""
  c = ml_collections.ConfigDict()
  c.method = "mp_mae"
  c.seed = 0  # parameter init and per-step randomness (masks, drop-path)
  c.data = pipeline.default_config()
  c.optimizer = optim.default_config()
  c.mesh = mesh_lib.default_config()
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 1.0  # passes over the training shards (the paper's epochs)
  c.train.num_steps = 0  # > 0: this many batches instead of num_epochs
  c.train.warmup_epochs = 0.0  # > 0: warmup length in epochs, else optimizer.warmup_steps
  c.train.log_every = 50
  c.train.progress = "auto"  # progress bar: auto (when a terminal), on, off
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.use_async = True
  c.init_from = ""  # a pretrained CHECKPOINT (see mmearth_jax.pretrained) to start from
  c.eval = eval_lib.default_config()  # periodic kNN / probes of the encoder
  return c


# ----------------------------------------------------------------------------------------------
# Methods: model, parameter init and loss from the config.


@dataclasses.dataclass
class Task:
  """What the loop needs from a method."""
  init: Callable[[jax.Array, Mapping[str, Any]], Any]  # (rng, batch) -> params
  # (params, batch, rng) -> (loss, aux); (params, batch, rng, teacher) with a teacher
  loss: Callable[..., tuple[jax.Array, dict]]
  layer_id: Callable[[tuple[str, ...]], int] | None
  num_layers: int
  batch_keys: tuple[str, ...] = ("image", "targets", "valid")  # what the step reads
  # A frozen teacher: () -> its parameters as host arrays, nested like the part of `params`
  # they mirror (e.g. {"encoder": ...}). Loaded once, kept in state["teacher"] beside (not in)
  # the params, so the optimizer never sees it; see `_place_teacher`.
  teacher: Callable[[], Any] | None = None


def mp_mae_task(config: ml_collections.ConfigDict, outputs: Mapping[str, Any]) -> Task:
  c = config.model
  model = MPMAE(outputs=dict(outputs), variant=c.variant, depths=tuple(c.depths) or None,
                dims=tuple(c.dims) or None, stem=c.stem, patch_size=c.patch_size,
                decoder_dim=c.decoder_dim, drop_path_rate=c.drop_path_rate,
                dtype=DTYPES[c.dtype], remat=c.remat)
  o = config.objective
  names = list(outputs)

  def init(rng, batch):
    images = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
    grid = images.shape[1] // c.patch_size
    return model.init(rng, images, jnp.zeros((1, grid, grid)))["params"]

  def loss(params, batch, rng):
    total, losses = mp_mae_loss(model, params, batch, rng, mask_ratio=o.mask_ratio,
                                norm_pix=o.norm_pix, aggregation=o.aggregation, train=True,
                                valid_pixels=o.valid_pixels)
    aux = {f"loss/{k}": v for k, v in losses.items()}
    if o.aggregation == "uncertainty":  # the learned weight exp(-s) of each modality's loss
      aux.update({f"weight/{k}": jnp.exp(-params["log_vars"][i]) for i, k in enumerate(names)})
    return total, aux

  return Task(init, loss, lambda path: optim.convnextv2_layer_id(path), 12)


def scale_mae_task(config: ml_collections.ConfigDict, outputs: Mapping[str, Any]) -> Task:
  del outputs  # Scale-MAE reconstructs its own (scale-augmented) input
  c, o = config.model, config.objective
  size = VIT_VARIANTS[c.variant]
  model = ScaleMAE(patch_size=c.patch_size, embed_dim=c.embed_dim or size["embed_dim"],
                   depth=c.depth or size["depth"], num_heads=c.num_heads or size["num_heads"],
                   decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
                   decoder_num_heads=c.decoder_num_heads, fcn_dim=c.fcn_dim,
                   fcn_layers=c.fcn_layers, independent_fcn_head=c.independent_fcn_head,
                   progressive=c.progressive, mask_ratio=o.mask_ratio,
                   pos_variant=c.pos_variant, absolute_scale=c.absolute_scale,
                   drop_path_rate=c.drop_path_rate, dtype=DTYPES[c.dtype], remat=c.remat)

  def init(rng, batch):
    images = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
    return model.init({"params": rng, "masking": rng}, images, jnp.ones((1,)))["params"]

  def loss(params, batch, rng):
    total, terms = scale_mae_loss(model, params, batch, rng, band_config=tuple(o.band_config),
                                  high_loss=o.high_loss, l1_weight=o.l1_weight)
    return total, {f"loss/{k}": v for k, v in terms.items()}

  return Task(init, loss, None, 0, batch_keys=("image", "target", "gsd"))


def gfm_task(config: ml_collections.ConfigDict, outputs: Mapping[str, Any]) -> Task:
  """GFM: a SimMIM student distilled from a frozen teacher of the same encoder architecture
  (config.teacher.checkpoint, e.g. an ImageNet-22k model imported by `mmearth-jax from-torch`)."""
  del outputs  # the student reconstructs its own (augmented) input
  c, o, t = config.model, config.objective, config.teacher
  encoder = gfm_model.build_encoder(
      c.arch, c.variant, depths=tuple(c.depths), dims=tuple(c.dims), patch_size=c.patch_size,
      embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads, mask_patch=o.mask_patch,
      drop_path_rate=c.drop_path_rate, dtype=DTYPES[c.dtype], remat=c.remat)
  model = gfm_model.SimMIM(encoder=encoder, distill_layer=o.distill_layer)
  if t.init_student not in ("random", "teacher"):
    raise TrainingError(f"config teacher.init_student = {t.init_student!r}; choose 'random' "
                        "(GFM's) or 'teacher'")

  def init(rng, batch):
    images = jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)
    gh = images.shape[1] // o.mask_patch
    gw = images.shape[2] // o.mask_patch
    return model.init(rng, images, jnp.zeros((1, gh, gw)))["params"]

  def loss(params, batch, rng, teacher):
    total, terms = gfm_loss(model, params, teacher, batch, rng, mask_patch=o.mask_patch,
                            mask_ratio=o.mask_ratio, alpha=o.alpha, teacher_size=t.image_size)
    return total, {f"loss/{k}": v for k, v in terms.items()}

  def load_teacher():
    return {"encoder": _teacher_encoder(config)}

  if c.arch == "vit":
    return Task(init, loss, lambda path: optim.vit_layer_id(path, encoder.depth), encoder.depth,
                batch_keys=("image",), teacher=load_teacher)
  return Task(init, loss, lambda path: optim.convnextv2_layer_id(path), 12,
              batch_keys=("image",), teacher=load_teacher)


def _teacher_encoder(config: ml_collections.ConfigDict) -> dict:
  """The encoder parameters of config.teacher.checkpoint (host arrays); a classifier head is
  left out (the teacher only gives intermediate features)."""
  path = config.teacher.checkpoint
  if not path:
    raise TrainingError("config teacher.checkpoint is empty: GFM needs a frozen teacher, e.g. a "
                        "model folder written by `mmearth-jax from-torch --checkpoint "
                        "convnextv2_base_22k_224_ema.pt --out DIR` (see configs/gfm.py)")
  try:
    model = pretrained.load(path)
  except pretrained.CheckpointError as e:
    raise TrainingError(f"config teacher.checkpoint = {path!r}: {e}") from e
  spec = pretrained.encoder_spec(model.spec)
  if spec["arch"] != config.model.arch:
    raise TrainingError(f"config teacher.checkpoint = {path!r} holds a {spec['arch']} encoder but "
                        f"config model.arch = {config.model.arch!r}: the teacher must have the "
                        "student's architecture")
  if spec["arch"] == "vit":  # heads leave no trace in the shapes
    heads = config.model.num_heads or VIT_VARIANTS[config.model.variant]["num_heads"]
    if int(spec["num_heads"]) != heads:
      raise TrainingError(f"config teacher.checkpoint = {path!r} is a ViT with "
                          f"{spec['num_heads']} attention heads but the student has {heads} "
                          "(config model.num_heads / model.variant)")
  params = pretrained.encoder_params(model.spec, model.params)
  return {k: v for k, v in params.items() if k != "head"}


def dense_contrastive_task(config: ml_collections.ConfigDict, outputs: Mapping[str, Any]
                           ) -> Task:
  """Dense contrastive pretraining (Embedding Earth): InfoNCE between the dense features of two
  views of each tile, made on device from the pipeline's Sentinel-2 crops."""
  del outputs  # only the input image is read; the pipeline's targets go unused
  model = DenseContrastive.from_config(config.model, config.objective)
  kw = objective_kwargs(config.objective)

  def init(rng, batch):
    return dense_contrastive_init(model, rng, batch["image"])

  def loss(params, batch, rng):
    return dense_contrastive_loss(model, params, batch, rng, **kw)

  return Task(init, loss, lambda path: optim.convnextv2_layer_id(path), 12, batch_keys=("image",))


TASKS = {"mp_mae": mp_mae_task, "scale_mae": scale_mae_task, "gfm": gfm_task,
         "dense_contrastive": dense_contrastive_task}


# ----------------------------------------------------------------------------------------------
# Sharded state and the jitted step.


def _check_config(config: ml_collections.ConfigDict) -> None:
  if config.method not in TASKS:
    raise TrainingError(f"config method = {config.method!r}; choose from {sorted(TASKS)}")
  if config.model.dtype not in DTYPES:
    raise TrainingError(f"config model.dtype = {config.model.dtype!r}; choose from {list(DTYPES)}")
  if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
    raise TrainingError("config train.num_steps or train.num_epochs must be > 0")
  if config.train.log_every <= 0:
    raise TrainingError("config train.log_every must be > 0")


def state_shardings(abstract_state: Mapping[str, Any], tx: optax.GradientTransformation,
                    mesh, rules, min_size: int) -> dict:
  """NamedShardings for {step, params, opt_state, rng[, teacher]}: params by the rules,
  optimizer moments like their parameters, everything else replicated. A teacher mirrors part
  of the params under the same paths, so the same rules lay it out exactly like them."""
  pspecs = mesh_lib.param_specs(abstract_state["params"], mesh, rules, min_size)
  ospecs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_state["opt_state"], pspecs,
                                 transform_non_params=lambda _: P(),
                                 is_leaf=lambda x: isinstance(x, P))
  specs = {"step": P(), "params": pspecs, "opt_state": ospecs, "rng": P()}
  if "teacher" in abstract_state:
    specs["teacher"] = mesh_lib.param_specs(abstract_state["teacher"], mesh, rules, min_size)
  return mesh_lib.to_shardings(specs, mesh)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    accum: int) -> Callable:
  """(state, batch) -> (state, metrics). A step with a non-finite loss or gradient leaves the
  state unchanged and reports finite = 0, so the state never holds NaNs."""

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    # The teacher is an argument, not a parameter: no gradient, no update, no optimizer moments.
    teacher = (state["teacher"],) if "teacher" in state else ()
    (loss, aux), grads = jax.value_and_grad(task.loss, has_aux=True)(state["params"], batch, rng,
                                                                     *teacher)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
           "rng": state["rng"], **{"teacher": t for t in teacher}}
    keep_old = {**state, "step": state["step"] + 1}
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, keep_old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"] // accum),
               "finite": finite.astype(jnp.float32), **aux}
    return new, metrics

  return train_step


# ----------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """SIGTERM sets a flag the loop polls; every process learns of it at the same step."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, nothing to restore
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.flag = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self.flag
    flags = multihost_utils.process_allgather(np.int32(self.flag))
    return bool(np.any(flags))


def _device_batch(batch: Mapping[str, Any], keys: tuple[str, ...]) -> dict:
  """What the step needs; host-only fields (row ids, S2 type) stay on the host."""
  return {k: batch[k] for k in keys}


def _make_data(config: ml_collections.ConfigDict):
  """(this host's batch iterator, records per epoch, input bands, outputs) of the method."""
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.num_epochs = 0  # the loop decides when to stop; the pipeline repeats
  if config.method in ("scale_mae", "gfm"):
    from mmearth_jax.data import scale_aug
    make = scale_aug.make_dataset if config.method == "scale_mae" else scale_aug.make_crop_dataset
    it, info = make(data_cfg)
    return iter(it), info["num_records"], info["bands"], {}
  manifest = convert.load_manifest(config.data.path)
  input_bands, outputs, _ = pipeline.resolve_config(config.data, manifest)
  return iter(pipeline.make_dataset(data_cfg)), manifest["num_records"], input_bands, outputs


def _progress_bar(mode: str, total: int, initial: int):
  if mode == "off" or (mode == "auto" and not sys.stderr.isatty()) or jax.process_index():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train(config: ml_collections.ConfigDict, workdir: str,
          log: Callable[[str], None] | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics."""
  _check_config(config)
  is_main = jax.process_index() == 0
  log = log or (lambda msg: print(msg, flush=True) if is_main else None)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # Mesh and data.
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicas = mesh.shape["data"] * mesh.shape["fsdp"]
  gbs = config.data.global_batch_size
  if gbs % replicas:
    raise TrainingError(f"config data.global_batch_size = {gbs} is not divisible by the "
                        f"mesh's data x fsdp = {replicas} devices")
  data_iter, num_records, input_bands, outputs = _make_data(config)

  steps_per_epoch = max(num_records // gbs, 1)
  total = config.train.num_steps or int(round(config.train.num_epochs * steps_per_epoch))
  accum = config.optimizer.grad_accum_steps
  opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  if config.train.warmup_epochs > 0:
    opt_cfg.warmup_steps = int(round(config.train.warmup_epochs * steps_per_epoch)) // accum

  if opt_cfg.warmup_steps >= max(total // accum, 1):
    raise TrainingError(f"the warmup ({opt_cfg.warmup_steps} optimizer steps, from "
                        "optimizer.warmup_steps or train.warmup_epochs) must be shorter than "
                        f"the run ({max(total // accum, 1)} optimizer steps)")

  # Model, optimizer and the sharded state.
  task = TASKS[config.method](config, outputs)
  fresh = data_iter.get_state()
  first = next(data_iter)  # shapes for init; then rewound (or moved by the restore)
  data_iter.set_state(fresh)
  abstract_params = jax.eval_shape(task.init, jax.random.key(0), first)
  teacher = _check_teacher(task.teacher(), abstract_params, config) if task.teacher else None
  tx, schedule = optim.make_optimizer(opt_cfg, abstract_params, global_batch=gbs * accum,
                                      total_steps=max(total // accum, 1),
                                      layer_id=task.layer_id, num_layers=task.num_layers)

  def init_state(rng):
    params = task.init(rng, first)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}

  abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
  if teacher is not None:  # checkpointed with the state: a resumed run needs nothing else
    abstract_state["teacher"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             teacher)
  shardings = state_shardings(abstract_state, tx, mesh, config.mesh.rules,
                              config.mesh.fsdp_min_size)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       every_steps=config.checkpoint.every_steps,
                                       keep=config.checkpoint.keep,
                                       use_async=config.checkpoint.use_async, log=log)
  state = checkpointer.restore(abstract_state, data_iter)
  if state is None:
    init_shardings = {k: v for k, v in shardings.items() if k != "teacher"}
    state = jax.jit(init_state, out_shardings=init_shardings)(jax.random.key(config.seed))
    log(f"initialised {_count(state['params']):,} parameters; training {total} steps")
    if config.init_from:
      state["params"] = _init_from(state["params"], config.init_from, log)
    if teacher is not None:
      state = _place_teacher(state, teacher, shardings, config.teacher.init_student, log)
  else:
    log(f"resumed from {checkpointer.directory}/{int(state['step'])}")
  start = int(state["step"])

  # The step, compiled ahead of time (surfaces out-of-memory before the loop starts).
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((gbs, *x.shape[1:]), x.dtype, sharding=batch_sharding),
      _device_batch(first, task.batch_keys))
  step_fn = jax.jit(make_train_step(task, tx, schedule, accum),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  compiled = step_fn.lower(abstract_state, abstract_batch).compile()
  flops = _flops(compiled)
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  log(f"mesh {dict(mesh.shape)}, global batch {gbs}, {flops / gbs / 1e9:.2f} GFLOP per image "
      f"(compiled step); workdir {os.path.abspath(workdir)}")

  evaluator = _make_evaluator(config, input_bands, mesh, log)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)

  def run_eval(step: int) -> None:
    result = evaluator(state["params"])
    writer.write(step, {f"eval/{k}": v for k, v in result.items()})
    log(f"step {step} eval on {config.eval.dataset}: " +
        ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items()))

  if evaluator and start == 0:
    run_eval(0)  # the randomly initialised encoder: the baseline training must beat
  bar = _progress_bar(config.train.progress, total, start)
  first: dict = {}
  last: dict = {}
  pending = None  # previous step's metrics: read one step late so the device stays busy
  window: list = []  # this log interval's metrics (device arrays, fetched at log time)
  t0, n0 = time.perf_counter(), start
  try:
    with _Preemption() as preemption:
      for step in range(start, total):
        batch = mesh_lib.global_batch(_device_batch(next(data_iter), task.batch_keys),
                                      batch_sharding)
        state, metrics = compiled(state, batch)
        if pending is not None:
          _stop_if_not_finite(*pending, checkpointer)
        pending = (step + 1, metrics)
        window.append(metrics)
        done = step + 1
        if bar is not None:
          bar.update(1)
        if done % config.train.log_every == 0 or done == total:
          _stop_if_not_finite(*pending, checkpointer)
          # Means over the interval: one batch's loss is too noisy to compare across logs.
          fetched = jax.device_get(window)
          host = {k: float(np.mean([m[k] for m in fetched])) for k in metrics
                  if k not in ("finite", "lr")}
          host["lr"] = float(fetched[-1]["lr"])
          window = []
          dt = time.perf_counter() - t0
          host["step_time_s"] = dt / (done - n0)
          host["images_per_s"] = gbs * (done - n0) / dt
          host["gflops_per_step"] = flops / 1e9
          if peak:
            host["mfu"] = flops / host["step_time_s"] / (peak * jax.device_count())
          writer.write(done, host)
          first = first or {"step": done, **host}
          last = {"step": done, **host}
          if bar is not None:
            bar.set_postfix(loss=f"{host['loss']:.4f}")
          else:
            log(f"step {done}/{total} loss {host['loss']:.4f} lr {host['lr']:.3g} "
                f"{host['images_per_s']:.1f} img/s")
          t0, n0 = time.perf_counter(), done
        if evaluator and (done % config.eval.every_steps == 0 or done == total):
          _stop_if_not_finite(*pending, checkpointer)
          run_eval(done)
        if checkpointer.due(done) or done == total:
          _stop_if_not_finite(*pending, checkpointer)
          checkpointer.save(done, state, data_iter)
        if preemption.requested():
          _stop_if_not_finite(*pending, checkpointer)
          if checkpointer.latest_step() != done:
            checkpointer.save(done, state, data_iter)
          checkpointer.wait()
          log(f"preempted (SIGTERM): saved step {done} in {checkpointer.directory}")
          return {**last, "preempted": True, "step": done}
  finally:
    if bar is not None:
      bar.close()
    checkpointer.wait()  # an async save in flight must land before exit
    checkpointer.close()
    writer.close()
  if first and last and last["step"] > first["step"]:
    log(f"loss {first['loss']:.4f} at step {first['step']} -> {last['loss']:.4f} at step "
        f"{last['step']}")
  log(f"done: {total} steps; checkpoints in {checkpointer.directory}, metrics in "
      f"{os.path.join(os.path.abspath(workdir), 'metrics.jsonl')} and "
      f"{os.path.join(os.path.abspath(workdir), 'tb')}")
  return last


def _make_evaluator(config: ml_collections.ConfigDict, input_bands, mesh, log
                    ) -> Callable[[Any], dict] | None:
  """params -> eval metrics of the encoder on config.eval.dataset, or None when off."""
  ec = config.eval
  if ec.every_steps <= 0:
    return None
  if not ec.dataset:
    raise TrainingError("config eval.every_steps > 0 needs eval.dataset (e.g. "
                        "mmearth:<shards>, geobench:<task folder>, tfds:eurosat/all)")
  evaluators = eval_lib.parse_evaluators(ec.evaluators)
  train_split, test_split = eval_lib.load_splits(ec, input_bands)
  spec = pretrained.spec_from_config(config)
  log(f"evaluating {','.join(evaluators)} every {ec.every_steps} steps on {ec.dataset} "
      f"({len(train_split.labels)} train / {len(test_split.labels)} test images"
      + (f", at {', '.join(f'{100 * s:g}%' for s in ec.scales)} of native resolution)"
         if tuple(ec.scales) != (1.0,) else ")"))

  def run(params) -> dict:
    return eval_lib.evaluate(spec, params, train_split, test_split, evaluators=evaluators,
                             ks=tuple(ec.knn_k), batch_size=ec.batch_size, mesh=mesh,
                             rules=config.mesh.rules, min_size=config.mesh.fsdp_min_size,
                             scales=tuple(ec.scales), gsd=ec.gsd)
  return run


def _init_from(params: Any, path: str, log) -> Any:
  """`params` with the leaves of a pretrained checkpoint put in (an encoder-only checkpoint
  fills the `encoder` subtree); every mismatch is named."""
  model = pretrained.load(path)
  src = traverse_util.flatten_dict(model.params)
  if model.spec["arch"] in pretrained.ENCODER_ARCHS:
    src = {("encoder", *k): v for k, v in src.items()}
  dst = traverse_util.flatten_dict(params)
  problems = [f"unexpected: {'/'.join(k)}" for k in src if k not in dst]
  problems += [f"mis-shaped: {'/'.join(k)} is {tuple(np.shape(v))} in {path}, the model needs "
               f"{tuple(dst[k].shape)}" for k, v in src.items()
               if k in dst and tuple(np.shape(v)) != tuple(dst[k].shape)]
  if problems:
    raise TrainingError(f"config init_from = {path!r} does not fit the model: "
                        + "; ".join(problems[:20]))
  for k, v in src.items():
    dst[k] = jax.device_put(jnp.asarray(v, dst[k].dtype), dst[k].sharding)
  log(f"initialised {len(src)} of {len(dst)} parameter tensors from {model.source}")
  return traverse_util.unflatten_dict(dst)


def _check_teacher(teacher: Any, abstract_params: Any, config: ml_collections.ConfigDict
                   ) -> dict:
  """The teacher (host arrays) in the parameters' dtypes, after checking that it holds exactly
  the tensors, with the same shapes, of the params subtrees it mirrors."""
  have = traverse_util.flatten_dict(teacher)
  want = {k: v for k, v in traverse_util.flatten_dict(abstract_params).items()
          if k[0] in teacher}
  problems = []
  for k, v in want.items():
    if k not in have:
      problems.append(f"{'/'.join(k)} {tuple(v.shape)} is missing from the teacher")
    elif tuple(np.shape(have[k])) != tuple(v.shape):
      problems.append(f"{'/'.join(k)} is {tuple(np.shape(have[k]))} in the teacher but "
                      f"{tuple(v.shape)} in the student")
  problems += [f"{'/'.join(k)} is in the teacher but not in the student" for k in have
               if k not in want]
  if problems:
    raise TrainingError(f"config teacher.checkpoint = {config.teacher.checkpoint!r} does not fit "
                        f"the student (config model.*): {problems[0]}"
                        + (f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1
                           else ""))
  return traverse_util.unflatten_dict(
      {k: np.asarray(have[k], want[k].dtype) for k in want})


def _place_teacher(state: dict, teacher: Any, shardings: Mapping[str, Any], init_student: str,
                   log) -> dict:
  """state with state["teacher"] laid out by its shardings; with init_student == "teacher" the
  student's mirrored parameters start as copies of it (separate buffers: the step donates
  the state)."""
  def put(x, sharding):  # every process holds the whole array; each device takes its shard
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  state = {**state, "teacher": jax.tree.map(put, teacher, shardings["teacher"])}
  n = len(jax.tree.leaves(teacher))
  if init_student == "teacher":
    params = traverse_util.flatten_dict(state["params"])
    for k, v in traverse_util.flatten_dict(teacher).items():
      params[k] = put(v, params[k].sharding)
    state["params"] = traverse_util.unflatten_dict(params)
    log(f"teacher: {n} frozen tensors; the student's copies of them start as the teacher")
  else:
    log(f"teacher: {n} frozen tensors; the student starts from random weights")
  return state


def _stop_if_not_finite(step: int, metrics: Mapping[str, Any], checkpointer) -> None:
  if float(metrics["finite"]) > 0:
    return
  checkpointer.wait()
  good = checkpointer.latest_step()
  where = (f"the last good checkpoint is {checkpointer.directory}/{good}" if good is not None
           else "no checkpoint was saved yet")
  raise TrainingError(f"non-finite loss at step {step} (loss = {float(metrics['loss'])}, "
                      f"grad norm = {float(metrics['grad_norm'])}); stopping. The update was "
                      f"not applied; {where}. Lower optimizer.base_lr or check the data.")


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _flops(compiled) -> float:
  """FLOPs of one step from XLA's cost analysis of the compiled executable (whole mesh)."""
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    return float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0
  except Exception:  # noqa: BLE001 - some backends report no cost analysis
    return 0.0
