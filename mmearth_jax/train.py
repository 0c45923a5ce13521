"""The training loop, read top to bottom: setup (mesh, data, the method's task, optimiser,
sharded state, the step compiled ahead of time, evaluators) -> the loop -> one log interval.

The same code runs on one CPU, a multi-GPU SLURM job or a TPU pod: each process feeds its slice
of the global batch, and `jax.jit` with named shardings does the rest. What is particular to a
method (its data, model, loss, teacher) comes from its module in `mmearth_jax.methods`, found by
`config.method`. Per-step randomness is `fold_in(rng, step)`, and the Grain iterator position is
checkpointed beside the state, so a resumed run repeats the uninterrupted run's steps exactly.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from mmearth_jax import cards
from mmearth_jax import checkpoint as ckpt_lib
from mmearth_jax import config_lib
from mmearth_jax import methods
from mmearth_jax import metrics as metrics_lib
from mmearth_jax import optim
from mmearth_jax import pretrained
from mmearth_jax.eval import evaluate as eval_lib
from mmearth_jax.parallel import mesh as mesh_lib


class TrainingError(RuntimeError):
  pass


def default_config() -> ml_collections.ConfigDict:
  """Sections every training config has (`config_lib.base_config`)."""
  return config_lib.base_config()


@dataclasses.dataclass
class Run:
  """Everything the loop needs, built by `setup`."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  batch_sharding: Any
  data_iter: Iterator
  task: methods.Task
  total: int  # steps to train in all (batches, not optimiser steps)
  state: dict
  step_fn: Any  # the compiled (state, batch) -> (state, metrics)
  flops: float  # per step, whole mesh
  checkpointer: ckpt_lib.Checkpointer
  evaluator: Callable[[Any], dict] | None
  log: Callable[[str], None]


def train(config: ml_collections.ConfigDict, workdir: str,
          log: Callable[[str], None] | None = None, *,
          provenance: Mapping[str, Any] | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the last logged metrics. `provenance` adds to
  the model card's (e.g. {"config": "mp_mae:atto", "overrides": [...]}, as the CLI gives)."""
  check_config(config)
  is_main = jax.process_index() == 0
  log = log or (lambda msg: print(msg, flush=True) if is_main else None)
  run = setup(config, workdir, log, provenance)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  try:
    return loop(run, writer)
  finally:
    run.checkpointer.wait()  # an async save in flight must land before exit
    run.checkpointer.close()
    writer.close()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises TrainingError naming the first config key the loop cannot run with."""
  try:
    methods.get(config.method)
  except config_lib.ConfigError as e:
    raise TrainingError(str(e)) from e
  if config.model.dtype not in methods.DTYPES:
    raise TrainingError(f"config model.dtype = {config.model.dtype!r}; choose from "
                        f"{list(methods.DTYPES)}")
  if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
    raise TrainingError("config train.num_steps or train.num_epochs must be > 0")
  if config.train.log_every <= 0:
    raise TrainingError("config train.log_every must be > 0")


# ----------------------------------------------------------------------------------------------
# Setup.


def setup(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None],
          provenance: Mapping[str, Any] | None = None) -> Run:
  """Mesh, data, the method's task, the model card (`<workdir>/card.json`), optimiser, sharded
  state (restored or initialised), the step compiled ahead of time (surfaces out-of-memory
  before the loop starts) and evaluators."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  method = methods.get(config.method)
  mesh = mesh_lib.make_mesh(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  gbs = config.data.global_batch_size
  replicas = mesh.shape["data"] * mesh.shape["fsdp"]
  if gbs % replicas:
    raise TrainingError(f"config data.global_batch_size = {gbs} is not divisible by the "
                        f"mesh's data x fsdp = {replicas} devices")
  data_iter, info = method.make_data(config)
  total, opt_cfg = _schedule(config, info.num_records)
  try:
    task = method.task(config, info)
  except config_lib.ConfigError as e:
    raise TrainingError(str(e)) from e
  if jax.process_index() == 0:
    _write_card(config, info, workdir, provenance)
  # Shapes for init; the iterator is rewound (or moved by the restore) afterwards.
  fresh = data_iter.get_state()
  example_batch = next(data_iter)
  data_iter.set_state(fresh)
  accum = config.optimizer.grad_accum_steps
  abstract_params = jax.eval_shape(task.init, jax.random.key(0), example_batch)
  tx, schedule = optim.make_optimizer(opt_cfg, abstract_params, global_batch=gbs * accum,
                                      total_steps=max(total // accum, 1),
                                      layer_id=task.layer_id, num_layers=task.num_layers)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       every_steps=config.checkpoint.every_steps,
                                       keep=config.checkpoint.keep,
                                       use_async=config.checkpoint.use_async, log=log)
  state, shardings = _initial_state(config, task, tx, example_batch, mesh, checkpointer,
                                    data_iter, total, log)
  step_fn, flops = _compile_step(task, tx, schedule, accum, state, shardings, example_batch,
                                 gbs, batch_sharding, mesh)
  log(f"mesh {dict(mesh.shape)}, global batch {gbs}, {flops / gbs / 1e9:.2f} GFLOP per image "
      f"(compiled step); workdir {os.path.abspath(workdir)}")
  evaluator = _make_evaluator(config, info.bands, mesh, log)
  return Run(config, workdir, mesh, batch_sharding, data_iter, task, total, state, step_fn,
             flops, checkpointer, evaluator, log)


def _write_card(config: ml_collections.ConfigDict, info: methods.DataInfo, workdir: str,
                provenance: Mapping[str, Any] | None) -> None:
  """`<workdir>/card.json`: the model card of this run's checkpoints (their loads add the step)."""
  try:
    card = cards.for_training(config, pretrained.spec_from_config(config), info, workdir,
                              provenance)
  except (pretrained.CheckpointError, ValueError) as e:
    raise TrainingError(f"cannot write the model card: {e}") from e
  cards.write(card, os.path.join(workdir, "card.json"))


def _schedule(config: ml_collections.ConfigDict, num_records: int
              ) -> tuple[int, ml_collections.ConfigDict]:
  """(steps to train, the optimiser section with the warmup in optimiser steps)."""
  steps_per_epoch = max(num_records // config.data.global_batch_size, 1)
  total = config.train.num_steps or int(round(config.train.num_epochs * steps_per_epoch))
  accum = config.optimizer.grad_accum_steps
  opt_cfg = ml_collections.ConfigDict(config.optimizer.to_dict())
  if config.train.warmup_epochs > 0:
    opt_cfg.warmup_steps = int(round(config.train.warmup_epochs * steps_per_epoch)) // accum
  if opt_cfg.warmup_steps >= max(total // accum, 1):
    raise TrainingError(f"the warmup ({opt_cfg.warmup_steps} optimizer steps, from "
                        "optimizer.warmup_steps or train.warmup_epochs) must be shorter than "
                        f"the run ({max(total // accum, 1)} optimizer steps)")
  return total, opt_cfg


def _initial_state(config, task: methods.Task, tx: optax.GradientTransformation,
                   example_batch: Mapping[str, Any], mesh, checkpointer, data_iter, total: int,
                   log) -> tuple[dict, dict]:
  """(state, its shardings): restored from the newest readable checkpoint, else initialised
  (then filled from `config.init_from`, and given the method's frozen teacher)."""
  def init_state(rng):
    params = task.init(rng, example_batch)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}

  abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
  teacher = _load_teacher(config, task, abstract_state["params"]) if task.teacher else None
  if teacher is not None:  # checkpointed with the state: a resumed run needs nothing else
    abstract_state["teacher"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             teacher)
  shardings = state_shardings(abstract_state, tx, mesh, config.mesh.rules,
                              config.mesh.fsdp_min_size)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, shardings)
  state = checkpointer.restore(abstract_state, data_iter)
  if state is not None:
    log(f"resumed from {checkpointer.directory}/{int(state['step'])}")
    return state, shardings
  init_shardings = {k: v for k, v in shardings.items() if k != "teacher"}
  state = jax.jit(init_state, out_shardings=init_shardings)(jax.random.key(config.seed))
  log(f"initialised {_count(state['params']):,} parameters; training {total} steps")
  if config.init_from:
    state["params"] = _init_from(state["params"], config.init_from, log)
  if teacher is not None:
    state = _place_teacher(state, teacher, shardings, config.teacher.init_student, log)
  return state, shardings


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


def make_train_step(task: methods.Task, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, accum: int) -> Callable:
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


def _compile_step(task, tx, schedule, accum: int, state, shardings, example_batch, gbs: int,
                  batch_sharding, mesh) -> tuple[Any, float]:
  """The jitted step lowered and compiled for the global batch, and its FLOPs."""
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((gbs, *x.shape[1:]), x.dtype, sharding=batch_sharding),
      _device_batch(example_batch, task.batch_keys))
  step_fn = jax.jit(make_train_step(task, tx, schedule, accum),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  compiled = step_fn.lower(abstract_state, abstract_batch).compile()
  return compiled, metrics_lib.compiled_flops(compiled)


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
  if methods.is_encoder(model.spec):
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


def _load_teacher(config: ml_collections.ConfigDict, task: methods.Task, abstract_params: Any
                  ) -> dict:
  """The method's frozen teacher from config.teacher.checkpoint (host arrays in the parameters'
  dtypes), after checking that it holds exactly the tensors, with the same shapes, of the
  params subtrees it mirrors."""
  path = config.teacher.checkpoint
  try:
    model = pretrained.load(path)
  except pretrained.CheckpointError as e:
    raise TrainingError(f"config teacher.checkpoint = {path!r}: {e}") from e
  try:
    teacher = task.teacher(pretrained.encoder_spec(model.spec),
                           pretrained.encoder_params(model.spec, model.params))
  except ValueError as e:  # the method's own check: "holds a vit encoder but ..."
    raise TrainingError(f"config teacher.checkpoint = {path!r} {e}") from e
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
    raise TrainingError(f"config teacher.checkpoint = {path!r} does not fit the student "
                        f"(config model.*): {problems[0]}"
                        + (f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1
                           else ""))
  return traverse_util.unflatten_dict({k: np.asarray(have[k], want[k].dtype) for k in want})


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


# ----------------------------------------------------------------------------------------------
# The loop.


def loop(run: Run, writer: metrics_lib.MetricWriter) -> dict:
  """Steps from the restored step to `run.total`; returns the last logged metrics."""
  config, ckpt = run.config, run.checkpointer
  start = int(run.state["step"])
  if run.evaluator and start == 0:
    _evaluate(run, writer, 0)  # the randomly initialised encoder: the baseline to beat
  interval = _Interval(run, writer, start)
  try:
    unchecked: list[tuple[int, Any]] = []  # (step, metrics) whose `finite` is not read yet
    with _Preemption() as preemption:
      for step in range(start, run.total):
        batch = mesh_lib.global_batch(_device_batch(next(run.data_iter), run.task.batch_keys),
                                      run.batch_sharding)
        run.state, metrics = run.step_fn(run.state, batch)
        done = step + 1
        interval.add(metrics)
        unchecked.append((done, metrics))
        log_due = done % config.train.log_every == 0 or done == run.total
        eval_due = run.evaluator and (done % config.eval.every_steps == 0 or done == run.total)
        save_due = ckpt.due(done) or done == run.total
        stop = preemption.requested()
        # The one sync point: before the host acts on the state every step so far must be
        # finite; otherwise only the steps before this one are read, so the device stays busy.
        acting = log_due or eval_due or save_due or stop
        ready, unchecked = (unchecked, []) if acting else (unchecked[:-1], unchecked[-1:])
        _stop_if_not_finite(ready, ckpt)
        if log_due:
          interval.log(done)
        if eval_due:
          _evaluate(run, writer, done)
        if save_due:
          ckpt.save(done, run.state, run.data_iter)
        if stop:
          if ckpt.latest_step() != done:
            ckpt.save(done, run.state, run.data_iter)
          ckpt.wait()
          run.log(f"preempted (SIGTERM): saved step {done} in {ckpt.directory}")
          return {**interval.last, "preempted": True, "step": done}
  finally:
    interval.close()
  interval.summary()
  workdir = os.path.abspath(run.workdir)
  run.log(f"done: {run.total} steps; checkpoints in {ckpt.directory}, metrics in "
          f"{os.path.join(workdir, 'metrics.jsonl')} and {os.path.join(workdir, 'tb')}")
  return interval.last


class _Interval:
  """One log interval: its step metrics (device arrays, fetched at log time) and the progress
  bar. Logged values are means over the interval: one batch's loss is too noisy to compare."""

  def __init__(self, run: Run, writer: metrics_lib.MetricWriter, start: int):
    self.run, self.writer = run, writer
    self.gbs = run.config.data.global_batch_size
    self.peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    self.bar = _progress_bar(run.config.train.progress, run.total, start)
    self.window: list = []
    self.first: dict = {}  # the first and the last logged metrics
    self.last: dict = {}
    self.t0, self.n0 = time.perf_counter(), start

  def add(self, metrics: Mapping[str, Any]) -> None:
    self.window.append(metrics)
    if self.bar is not None:
      self.bar.update(1)

  def log(self, done: int) -> None:
    fetched = jax.device_get(self.window)
    host = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
            if k not in ("finite", "lr")}
    host["lr"] = float(fetched[-1]["lr"])
    dt = time.perf_counter() - self.t0
    host["step_time_s"] = dt / (done - self.n0)
    host["images_per_s"] = self.gbs * (done - self.n0) / dt
    host["gflops_per_step"] = self.run.flops / 1e9
    if self.peak:
      host["mfu"] = self.run.flops / host["step_time_s"] / (self.peak * jax.device_count())
    self.writer.write(done, host)
    self.first = self.first or {"step": done, **host}
    self.last = {"step": done, **host}
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{host['loss']:.4f}")
    else:
      self.run.log(f"step {done}/{self.run.total} loss {host['loss']:.4f} lr {host['lr']:.3g} "
                   f"{host['images_per_s']:.1f} img/s")
    self.window = []
    self.t0, self.n0 = time.perf_counter(), done

  def summary(self) -> None:
    if self.first and self.last and self.last["step"] > self.first["step"]:
      self.run.log(f"loss {self.first['loss']:.4f} at step {self.first['step']} -> "
                   f"{self.last['loss']:.4f} at step {self.last['step']}")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None


def _evaluate(run: Run, writer: metrics_lib.MetricWriter, step: int) -> None:
  result = run.evaluator(run.state["params"])
  writer.write(step, {f"eval/{k}": v for k, v in result.items()})
  run.log(f"step {step} eval on {run.config.eval.dataset}: " +
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items()))


def _stop_if_not_finite(steps: list[tuple[int, Any]], checkpointer) -> None:
  """Raises TrainingError at the first of `steps` whose loss or gradient was not finite."""
  if not steps:
    return
  finite = jax.device_get([m["finite"] for _, m in steps])
  bad = next((i for i, f in enumerate(finite) if float(f) <= 0), None)
  if bad is None:
    return
  step, metrics = steps[bad]
  checkpointer.wait()
  good = checkpointer.latest_step()
  where = (f"the last good checkpoint is {checkpointer.directory}/{good}" if good is not None
           else "no checkpoint was saved yet")
  raise TrainingError(f"non-finite loss at step {step} (loss = {float(metrics['loss'])}, "
                      f"grad norm = {float(metrics['grad_norm'])}); stopping. The update was "
                      f"not applied; {where}. Lower optimizer.base_lr or check the data.")


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


def _progress_bar(mode: str, total: int, initial: int):
  if mode == "off" or (mode == "auto" and not sys.stderr.isatty()) or jax.process_index():
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
