"""Where the CPU time of the MP-MAE atto training step goes: ours (per XLA op) and PyTorch's.

Builds the same step as `benchmarks/train_step.py` (ConvNeXt V2 atto, MMEarth stem, 112 px,
16 px patches, 12 outputs, AdamW; the trainer's jitted step), then:

- ours: runs `--steps` steps under `jax.profiler`. XLA:CPU's thunk runtime emits one trace event
  per executed HLO op (thunk), named as the op in the optimized HLO (`compiled.as_text()`), so
  each event is joined to its HLO instruction: opcode, shape, the ops fused into it, and the
  `op_name` metadata (`jit(train_step)/jvp(MPMAE)/encoder/stage_0_block_0/dwconv/...`), which
  says the phase (forward `jvp(...)`, backward `transpose(jvp(...))`, optimizer and the
  non-finite guard outside both) and the Flax module. Times are summed per op over the steps.
- PyTorch: the reference step of train_step.py under `torch.profiler` (self CPU time per aten
  op), with record_function ranges for the encoder / decoder-block / loss / backward / optimizer.

Prints, for each: time by phase x op category, and the top ops. Op times are summed thread
time: with 2 cores XLA may run two independent thunks at once and intra-op threads are not
separated, so shares are of the summed op time, printed next to the step's wall time.

    python benchmarks/profile_step.py [--batch 32] [--steps 2] [--no-torch] [--dump DIR]
      [--trace DIR] [--top 15]

`--dump DIR` also writes XLA's HLO dump (before/after optimisation) there (large; never commit).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time


def _args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="atto")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=int, default=2, help="profiled steps (after warm-up)")
  p.add_argument("--top", type=int, default=15, help="rows of the top-op tables")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch profile")
  p.add_argument("--dump", default="", help="write the XLA HLO dump to this directory")
  p.add_argument("--trace", default="", help="keep the jax.profiler trace here (TensorBoard / "
                 "Perfetto); default: a temporary directory")
  return p.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.dump:  # must be set before jax initialises its backend
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={ARGS.dump} --xla_dump_hlo_as_text").strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step as ts  # noqa: E402  (benchmarks/train_step.py: the same builders)
from mmearth_jax import modalities as M  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Optimized HLO: instruction name -> (opcode, shape, fused opcodes, op_name).

_COMP = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_CALLS = re.compile(r"(?:calls|to_apply|body)=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
DATA_MOVEMENT = {"transpose", "copy", "bitcast", "reshape", "slice", "dynamic-slice", "concatenate",
                 "pad", "broadcast", "parameter", "constant", "tuple", "get-tuple-element",
                 "dynamic-update-slice", "iota", "reverse", "copy-start", "copy-done"}


def _split_shape(rest: str) -> tuple[str, str]:
  """'f32[2,3]{1,0} fusion(...' -> ('f32[2,3]', 'fusion(...'); tuple shapes kept whole."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return re.sub(r"\{[^}]*\}", "", shape), tail


def parse_hlo(text: str):
  """{computation: [instr]}, entry name; instr = dict(name, opcode, shape, calls, op_name)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _COMP.match(line)
      if m:
        cur = m.group(2)
        comps[cur] = []
        if m.group(1):
          entry = cur
      continue
    if cur is None:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape, tail = _split_shape(line[m.end():])
    op = re.match(r"([\w\-]+)\(", tail)
    on = _OPNAME.search(line)
    comps[cur].append({"name": m.group(1), "opcode": op.group(1) if op else "?", "shape": shape,
                       "calls": _CALLS.findall(tail), "op_name": on.group(1) if on else "",
                       "line": line})
  return comps, entry


def _fused(comps, names, seen=None):
  """All instructions of the computations `names` (recursively through calls)."""
  seen = set() if seen is None else seen
  out = []
  for c in names:
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for ins in comps[c]:
      out.append(ins)
      out += _fused(comps, ins["calls"], seen)
  return out


def op_table(comps):
  """name -> info for every instruction of every computation (thunks can be nested)."""
  table = {}
  for instrs in comps.values():
    for ins in instrs:
      inner = _fused(comps, ins["calls"]) if ins["opcode"] in ("fusion", "call") else []
      op_name = ins["op_name"]
      if not op_name:  # fusions without metadata: take their root's (last instruction's)
        named = [i["op_name"] for i in inner if i["op_name"]]
        op_name = named[-1] if named else ""
      table[ins["name"]] = dict(ins, inner=[i["opcode"] for i in inner],
                                inner_dots=[i for i in inner if i["opcode"] in ("dot", "convolution")],
                                op_name=op_name)
  return table


def hlo_kind(info) -> str:
  ops = set(info["inner"]) | {info["opcode"]}
  if "convolution" in ops:
    return "conv"
  if "dot" in ops:
    return "dot"
  if info["opcode"] in ("while", "call", "conditional", "sort", "custom-call"):
    return info["opcode"]
  if ops & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduce"
  if ops - {"fusion"} <= DATA_MOVEMENT:
    return "copy/transpose"
  return "elementwise"


def phase_of(op_name: str) -> tuple[str, str]:
  """(component, direction) from the op_name metadata."""
  if "transpose(jvp(" in op_name:
    d = "bwd"
  elif "jvp(" in op_name:
    d = "fwd"
  else:
    return "optimizer+guard", ""
  if "MPMAE" not in op_name:
    return "loss+mask", d
  path = op_name.split("MPMAE", 1)[1]
  if "/encoder/" in path or path.startswith(")/encoder") or "/encoder" in path:
    return "encoder", d
  if "/decoder" in path or "/proj" in path or "mask_token" in path:
    return "decoder", d
  if "/head_" in path or "/image_norm" in path:
    return "heads", d
  return "model other", d


_NORMS = ("initial_norm", "stem_norm", "downsample_1_norm", "downsample_2_norm",
          "downsample_3_norm", "image_norm", "/norm/")


def category(info, kind: str) -> str:
  on = info["op_name"]
  comp, _ = phase_of(on)
  if comp == "optimizer+guard":
    return "optimizer"
  if "/dwconv/" in on or on.endswith("/dwconv"):
    return "dwconv 7x7"
  if "initial_conv" in on or "stem_conv" in on or "_stem" in on and kind in ("dot", "conv"):
    return "stem conv"
  if "downsample_" in on and "_conv" in on:
    return "downsample conv"
  if kind in ("dot", "conv"):
    if "pwconv" in on:
      return "1x1 matmul"
    return "other matmul"
  if any(n in on for n in _NORMS):
    return "LayerNorm"
  if "/grn/" in on:
    return "GRN"
  if kind == "copy/transpose":
    return "copy/transpose"
  return "elementwise"


CATS = ["dwconv 7x7", "stem conv", "downsample conv", "1x1 matmul", "other matmul", "LayerNorm",
        "GRN", "elementwise", "copy/transpose", "optimizer"]


def _short(op_name: str, n: int = 3) -> str:
  parts = [p for p in op_name.replace("jit(train_step)/", "").split("/") if p]
  return "/".join(parts[-n:])


def _dot_shape(info) -> str:
  d = info["inner_dots"][0] if info["inner_dots"] else info
  line = d["line"]
  ops = re.findall(r"(?:f32|bf16|f16)\[[\d,]*\]", line)
  return " x ".join(ops[1:3]) + " -> " + d["shape"] if len(ops) >= 3 else d["shape"]


# ------------------------------------------------------------------------------------------------
# Trace -> per-op times.


def trace_events(trace_dir: str):
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not path:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  data = json.load(gzip.open(path[-1]))
  ev = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in ev if e.get("ph") == "X" and "dur" in e]


def print_matrix(title, rows, total_ms, wall_ms):
  """rows: {(component, dir): {cat: ms}}."""
  cats = [c for c in CATS if any(r.get(c) for r in rows.values())]
  cats += sorted({c for r in rows.values() for c in r} - set(cats))
  w = max(9, *(len(c) + 1 for c in cats))
  print(f"\n{title}: ms per step (% of summed op time {total_ms:.0f} ms; wall {wall_ms:.0f} ms)")
  print(f"{'phase':<22}" + "".join(f"{c:>{w}}" for c in cats) + f"{'total':>9}{'%':>7}")
  order = sorted(rows, key=lambda k: -sum(rows[k].values()))
  col = collections.Counter()
  for k in order:
    r = rows[k]
    col.update(r)
    tot = sum(r.values())
    label = " ".join(x for x in k if x)
    print(f"{label:<22}" + "".join(f"{r.get(c, 0):>{w}.0f}" for c in cats) +
          f"{tot:>9.0f}{tot / total_ms:>7.1%}")
  print(f"{'all':<22}" + "".join(f"{col.get(c, 0):>{w}.0f}" for c in cats) + f"{total_ms:>9.0f}")
  print(f"{'%':<22}" + "".join(f"{col.get(c, 0) / total_ms:>{w}.1%}" for c in cats))


def profile_jax(args):
  outputs = M.output_preset("all")
  batch = ts.fake_batch(outputs, args.batch, args.size)
  config = ts.config_for(args.variant, args.size, args.patch, args.batch, args.dtype)
  jb = jax.tree.map(jnp.asarray, batch)
  step, state, _ = ts.trainer_step(config, outputs, jb)
  t0 = time.perf_counter()
  compiled = step.lower(state, jb).compile()
  print(f"compiled in {time.perf_counter() - t0:.1f} s")
  comps, _ = parse_hlo(compiled.as_text())
  table = op_table(comps)
  for _ in range(2):  # warm-up
    state, m = step(state, jb)
    jax.block_until_ready(m["loss"])
  walls = []
  for _ in range(args.steps):  # unprofiled wall time, for reference
    t0 = time.perf_counter()
    state, m = step(state, jb)
    jax.block_until_ready(m["loss"])
    walls.append(time.perf_counter() - t0)
  trace_dir = args.trace or tempfile.mkdtemp(prefix="jax_trace_")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, jb)
    jax.block_until_ready(m["loss"])
  prof_wall = (time.perf_counter() - t0) / args.steps
  jax.profiler.stop_trace()

  events = trace_events(trace_dir)
  if not args.trace:
    shutil.rmtree(trace_dir, ignore_errors=True)
  per_op = collections.Counter()
  unmatched = collections.Counter()
  for e in events:
    name = e["name"]
    if name in table:
      per_op[name] += e["dur"] / 1e3 / args.steps  # us -> ms per step
    elif not name.startswith("end: "):
      unmatched[name] += e["dur"] / 1e3 / args.steps
  # Control flow thunks (while/call) contain their body's thunks: count the outer op only.
  nested = set()
  for name in per_op:
    if table[name]["opcode"] in ("while", "call", "conditional"):
      nested |= {i["name"] for i in _fused(comps, table[name]["calls"])}
  for name in nested & set(per_op):
    del per_op[name]
  total = sum(per_op.values())
  wall = float(np.median(walls)) * 1e3
  print(f"\nours: {args.variant} MP-MAE step, batch {args.batch}, {args.size} px: wall "
        f"{wall:.0f} ms/step (median of {args.steps}), {prof_wall * 1e3:.0f} ms under the profiler; "
        f"{len(per_op)} distinct ops ran, summed op time {total:.0f} ms/step")

  rows = collections.defaultdict(collections.Counter)
  kinds = collections.defaultdict(collections.Counter)
  for name, ms in per_op.items():
    info = table[name]
    kind = hlo_kind(info)
    rows[phase_of(info["op_name"])][category(info, kind)] += ms
    kinds[phase_of(info["op_name"])][kind] += ms
  print("('fwd' = ops under jvp(...): the forward pass AND the residuals autodiff saves for the "
        "backward, e.g. GELU's exp term; 'bwd' = transpose(jvp(...)))")
  print_matrix("ours by phase x op category", rows, total, wall)
  print_matrix("ours by phase x HLO kind", kinds, total, wall)

  # Dots by shape class (M x K x N of the matmul).
  dots = collections.Counter()
  for name, ms in per_op.items():
    info = table[name]
    if hlo_kind(info) in ("dot", "conv"):
      comp, d = phase_of(info["op_name"])
      dots[(f"{comp} {d}".strip(), category(info, "dot"), _dot_shape(info))] += ms
  print(f"\nours: matmuls by shape ({sum(dots.values()):.0f} ms, "
        f"{sum(dots.values()) / total:.1%}); top {args.top}")
  for (ph, cat, shp), ms in dots.most_common(args.top):
    print(f"  {ms:8.1f} ms {ms / total:6.1%}  {ph:<16}{cat:<16}{shp}")

  print(f"\nours: top {args.top} ops")
  print(f"  {'ms':>8} {'%':>6}  {'op':<34}{'kind':<15}{'shape':<22}op_name")
  for name, ms in per_op.most_common(args.top):
    info = table[name]
    print(f"  {ms:8.1f} {ms / total:6.1%}  {name[:33]:<34}{hlo_kind(info):<15}"
          f"{info['shape'][:21]:<22}{_short(info['op_name'], 4)}")

  # Same category, summed over all ops of one module path (e.g. every stage-0 dwconv backward).
  groups = collections.Counter()
  for name, ms in per_op.items():
    info = table[name]
    comp, d = phase_of(info["op_name"])
    stage = re.search(r"stage_(\d)", info["op_name"])
    where = f"{comp}{' s' + stage.group(1) if stage else ''} {d}".strip()
    groups[(where, category(info, hlo_kind(info)))] += ms
  print(f"\nours: top {args.top} (phase, stage, category) groups")
  for (where, cat), ms in groups.most_common(args.top):
    print(f"  {ms:8.1f} ms {ms / total:6.1%}  {where:<22}{cat}")
  executor = unmatched.get("ThunkExecutor::Execute", 0.0)
  if executor:  # the executor's span covers the whole step: the gap is dispatch between thunks
    print(f"\n(thunk executor span {executor:.0f} ms/step vs summed op time {total:.0f} ms/step)")
  if args.trace:
    print(f"trace kept in {args.trace} (TensorBoard profile plugin or ui.perfetto.dev)")
  return per_op, table


# ------------------------------------------------------------------------------------------------
# PyTorch reference step under torch.profiler.


def _torch_category(name: str, shapes) -> str:
  n = name.lower()
  flat = [s for s in (shapes or []) if isinstance(s, (list, tuple))]
  depthwise = any(len(s) == 4 and s[1] == 1 and s[2] == s[3] == 7 for s in flat)
  if "conv" in n:
    if depthwise:
      return "dwconv 7x7"
    if any(len(s) == 4 and s[2] >= 100 for s in flat):  # the MMEarth stem runs at ~110 px
      return "stem conv"
    if any(len(s) == 4 and s[2] == s[3] == 2 for s in flat):
      return "downsample conv"
    return "other matmul"  # 1x1 convs: proj and pixel heads
  if any(k in n for k in ("addmm", "::mm", "bmm", "matmul", "linear")):
    return "1x1 matmul" if any(len(s) == 2 and s[-1] in (40, 80, 160, 320, 160 * 4, 320 * 4)
                               for s in flat) else "other matmul"
  if "layer_norm" in n:
    return "LayerNorm"
  if any(k in n for k in ("copy_", "clone", "contiguous", "permute", "transpose", "_to_copy")):
    return "copy/transpose"
  if any(k in n for k in ("adam", "_foreach", "lerp", "addcdiv", "addcmul")):
    return "optimizer"
  return "elementwise"


def profile_torch(args):
  import torch
  from torch.autograd.profiler import record_function
  from torch.profiler import ProfilerActivity, profile

  from mmearth_jax.interop.torch_convnextv2 import MPMAETorch
  from mmearth_jax.models.mp_mae import random_patch_mask
  import torch.nn.functional as F  # noqa: F401

  torch.set_num_threads(os.cpu_count())
  outputs = M.output_preset("all")
  batch = ts.fake_batch(outputs, args.batch, args.size)
  model = MPMAETorch(outputs, in_chans=12, variant=args.variant, stem="mmearth",
                     patch_size=args.patch)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  g = args.size // args.patch
  log_vars = model.loss_fn.log_vars
  fwd_map = model.encoder.forward_map

  def encoder_map(*a, **k):
    with record_function("phase:encoder fwd"):
      return fwd_map(*a, **k)

  model.encoder.forward_map = encoder_map
  shared = next(iter(model.decoder_dict.values()))[0]
  ranges = []
  shared.register_forward_pre_hook(lambda *_: ranges.append(record_function("phase:decoder fwd").__enter__()))
  shared.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None))

  def step(seed):
    mask = torch.from_numpy(np.asarray(random_patch_mask(jax.random.key(seed), x.shape[0], g, 0.6)))
    with record_function("phase:model fwd"):
      preds = model(x, mask)
    with record_function("phase:loss fwd"):
      losses = ts.torch_losses(preds, batch, mask.reshape(x.shape[0], -1), args.patch)
      vals = torch.stack(list(losses.values()))
      total = (torch.exp(-log_vars) * vals + log_vars)[vals != 0].sum()
    with record_function("phase:backward"):
      opt.zero_grad()
      total.backward()
    with record_function("phase:optimizer"):
      opt.step()

  step(0)
  walls = []
  for i in range(args.steps):
    t0 = time.perf_counter()
    step(i + 1)
    walls.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for i in range(args.steps):
      step(i + 10)
  prof_wall = (time.perf_counter() - t0) / args.steps * 1e3
  wall = float(np.median(walls)) * 1e3

  def phase(ev):
    labels = []
    p = ev.cpu_parent
    while p is not None:
      if p.name.startswith("phase:"):
        labels.append(p.name[6:])
      p = p.cpu_parent
    for want in ("encoder fwd", "decoder fwd", "backward", "optimizer", "loss fwd"):
      if want in labels:
        return want
    return "heads fwd" if "model fwd" in labels else "other"

  rows = collections.defaultdict(collections.Counter)
  top = collections.Counter()
  for ev in prof.events():
    if ev.name.startswith("phase:") or ev.self_cpu_time_total <= 0:
      continue
    ms = ev.self_cpu_time_total / 1e3 / args.steps
    cat = _torch_category(ev.name, ev.input_shapes)
    ph = phase(ev)
    if ph == "backward":  # attribute a backward kernel to its category via the autograd node
      p, node = ev.cpu_parent, ""
      while p is not None and not node:
        if "evaluate_function" in p.name:
          node = p.name.split(": ")[-1]
        p = p.cpu_parent
      if "Convolution" in node and cat == "elementwise":
        cat = _torch_category("conv", ev.input_shapes)
    rows[(ph,)][cat] += ms
    shapes = ",".join("x".join(map(str, s)) for s in (ev.input_shapes or []) if s)[:40]
    top[(ev.name, ph, shapes)] += ms
  total = sum(top.values())
  print(f"\nPyTorch reference step (decoder block x12), batch {args.batch}: wall {wall:.0f} ms/step "
        f"(median of {args.steps}), {prof_wall:.0f} ms under the profiler; summed self CPU time "
        f"{total:.0f} ms/step")
  print_matrix("torch by phase x op category", rows, total, wall)
  print(f"\ntorch: top {args.top} ops (self CPU time)")
  for (name, ph, shapes), ms in top.most_common(args.top):
    print(f"  {ms:8.1f} {ms / total:6.1%}  {name[:40]:<41}{ph:<13}{shapes}")


def main():
  args = ARGS or _args()
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} cores; "
        f"jax {jax.__version__}")
  profile_jax(args)
  if not args.no_torch:
    profile_torch(args)


if __name__ == "__main__":
  main()
