"""Training metrics: JSON lines and TensorBoard event files in the workdir (process 0 only).

`<workdir>/metrics.jsonl` has one object per logged step, e.g.
  {"step": 100, "loss": 3.2, "loss/sentinel2": 0.9, "weight/sentinel2": 1.1, "lr": 2e-4, ...}
A resumed run appends; the last line for a step is the one that counts.
`<workdir>/tb/` holds TensorBoard scalars of the same names (`tensorboard --logdir <workdir>/tb`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

# Dense bf16 peak FLOP/s per chip from the vendors' specifications, by device_kind substring.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Per-device peak, or None where unknown (CPUs)."""
  for key, value in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return value
  return None


def compiled_flops(compiled) -> float:
  """FLOPs of one step from XLA's cost analysis of a compiled executable (whole mesh: the
  per-device count times the devices), or 0 where the backend reports none."""
  import jax
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends report no cost analysis
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # pure-Python event writer, no TensorFlow
      self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v)))
             for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_jsonl(path: str) -> dict[int, dict]:
  """{step: metrics} of a metrics.jsonl. Lines of one step are merged (training metrics and
  evaluation are written separately); a later value of a key replaces an earlier one (a resumed
  run repeats the steps after its checkpoint)."""
  out = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
  return out
