"""One process of the two-process input-pipeline test (run by tests/test_multihost.py).

    python tests/multihost_worker.py --process-id I --port P --data DIR --out FILE

Joins a 2-process `jax.distributed` job on 127.0.0.1:P with 4 simulated CPU devices per process,
iterates one epoch of `pipeline.make_dataset` (which must find this host's place from jax itself),
assembles each per-host batch of `row` into one global jax.Array over all 8 devices, reduces it
with a jitted sum, and writes what it saw as JSON to FILE.
"""
import argparse
import json
import os
import sys

# Before jax is imported: 4 simulated CPU devices in this process.
_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--data", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  args = parser.parse_args()

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=90)

  from mmearth_jax.data import pipeline

  cfg = pipeline.default_config()
  cfg.path = args.data
  cfg.global_batch_size = 8
  cfg.num_epochs = 1
  ds = pipeline.make_dataset(cfg)  # no process_index / process_count: taken from jax

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  global_sum = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))

  batches, sums, gathered, global_shapes, local_indices = [], [], [], [], []
  it = iter(ds)
  try:
    for batch in it:
      rows = np.asarray(batch["row"])
      batches.append(rows.tolist())
      garr = jax.make_array_from_process_local_data(sharding, rows)
      global_shapes.append(list(garr.shape))
      # Which slice of the global array this host's devices hold.
      local_indices.append(sorted(
          [s.index[0].start or 0, s.index[0].stop] for s in garr.addressable_shards))
      sums.append(int(global_sum(garr)))
      gathered.append(np.asarray(
          multihost_utils.process_allgather(garr, tiled=True)).tolist())
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()

  result = {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "device_process_indices": [d.process_index for d in jax.devices()],
      "batches": batches,
      "global_sums": sums,
      "global_arrays": gathered,
      "global_shapes": global_shapes,
      "local_indices": local_indices,
  }
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, args.out)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())
