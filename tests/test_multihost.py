"""The Grain input pipeline in two real `jax.distributed` processes on this machine.

Each process has 4 simulated CPU devices; together they form one 8-device mesh. The test checks
that `make_dataset`, told nothing about its host, slices the epoch disjointly and completely
between the two hosts, that each global batch (host 0's slice, then host 1's) is exactly the
single-host batch, so a job's data does not depend on its process count, and that the per-host
batches assemble into one global jax.Array whose jitted sum both hosts agree on.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from _env import cpu_env

from mmearth_jax.data import convert, pipeline, synth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
NUM_RECORDS = 32
GLOBAL_BATCH = 8
TIMEOUT_S = 180
FAILURE_GRACE_S = 15


@pytest.fixture(scope="module")
def shards32(tmp_path_factory):
  sample = str(tmp_path_factory.mktemp("mh_sample"))
  synth.write_sample(sample, n=NUM_RECORDS, size=64, seed=0)
  out = str(tmp_path_factory.mktemp("mh_shards"))
  convert.convert(sample, out, shards=4, log=lambda *a: None)
  return out


def _run_workers(data: str, out_dir) -> list[dict]:
  port = portpicker.pick_unused_port()
  env = cpu_env(DEVICES_PER_PROCESS)
  outs = [str(out_dir / f"host{i}.json") for i in range(NUM_PROCESSES)]
  logs = [open(out_dir / f"host{i}.stderr", "w+") for i in range(NUM_PROCESSES)]
  procs = []
  try:
    for i in range(NUM_PROCESSES):
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, "--process-id", str(i), "--port", str(port),
           "--data", data, "--out", outs[i], "--num-processes", str(NUM_PROCESSES)],
          cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
    # One deadline for both; once one fails, the other (maybe blocked in a collective or in
    # jax.distributed.initialize) gets a short grace period before it is killed.
    deadline = time.monotonic() + TIMEOUT_S
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        break
      if any(c not in (None, 0) for c in codes):
        deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
      if time.monotonic() > deadline:
        break
      time.sleep(0.1)
    timed_out = any(c is None for c in codes)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = []
  for i, f in enumerate(logs):
    f.seek(0)
    code = codes[i] if i < len(codes) else "not started"
    text.append(f"----- process {i} (exit {code}) -----\n"
                + f.read()[-8000:])
    f.close()
  if timed_out or any(c != 0 for c in codes) or not all(os.path.exists(o) for o in outs):
    msg = "\n".join(text)
    print(msg)
    pytest.fail(f"multihost workers failed (codes {codes}, timed out {timed_out}):\n{msg}")
  results = []
  for o in outs:
    with open(o) as f:
      results.append(json.load(f))
  return results


def test_two_processes_split_the_epoch(shards32, tmp_path):
  results = _run_workers(shards32, tmp_path)
  steps = NUM_RECORDS // GLOBAL_BATCH
  per_host = GLOBAL_BATCH // NUM_PROCESSES

  # The job: 2 processes, 8 devices in all, 4 each, devices ordered by process.
  for i, r in enumerate(results):
    assert r["process_index"] == i
    assert r["process_count"] == NUM_PROCESSES
    assert r["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert r["local_device_count"] == DEVICES_PER_PROCESS
    assert len(r["batches"]) == steps
    assert all(len(b) == per_host for b in r["batches"])

  # Disjoint slices that together cover the epoch exactly once.
  seen = [[row for b in r["batches"] for row in b] for r in results]
  for rows in seen:
    assert len(rows) == NUM_RECORDS // NUM_PROCESSES
    assert len(set(rows)) == len(rows)
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_RECORDS))

  # Relation to the single-host epoch: the same shuffled order, cut into per-host batches dealt
  # in host order, so global batch k (host 0's batch k, then host 1's) is exactly the
  # single host's batch k: a job's batches do not depend on its process count.
  cfg = pipeline.default_config()
  cfg.path = shards32
  cfg.global_batch_size = GLOBAL_BATCH
  cfg.num_epochs = 1
  single = [b["row"].tolist() for b in pipeline.make_dataset(cfg, process_index=0,
                                                               process_count=1)]
  assert len(single) == steps
  for k in range(steps):
    assert results[0]["batches"][k] + results[1]["batches"][k] == single[k]

  # One global array per step: shape (8,), host 0's rows on its 4 devices then host 1's;
  # the jitted global sum agrees between the hosts and is the sum over both hosts' rows.
  for k in range(steps):
    local0, local1 = results[0]["batches"][k], results[1]["batches"][k]
    for i, r in enumerate(results):
      assert r["global_shapes"][k] == [GLOBAL_BATCH]
      assert r["global_arrays"][k] == local0 + local1
      assert r["local_indices"][k] == [[i * per_host + d, i * per_host + d + 1]
                                       for d in range(DEVICES_PER_PROCESS)]
    assert results[0]["global_sums"][k] == results[1]["global_sums"][k]
    assert results[0]["global_sums"][k] == int(np.sum(local0 + local1)) == sum(single[k])
