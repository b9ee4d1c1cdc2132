"""One of two processes (4 simulated CPU devices each) loading the Llama fixture into fsdp over all 8.

  python tests/hf_sharded_load_worker.py PROCESS_ID PORT OUT_JSON

Run by tests/test_hf_sharded_load.py. Writes OUT_JSON.<PROCESS_ID>: every slice this process read
(through load_model's recorder), which process holds each fsdp position of the mesh, the largest
difference between a shard this process holds and the same slice of a whole-tensor load, and
(process 0) the largest difference between the sharded model's logits and transformers'.
"""

import json
import os
import sys

import xla_flags  # tests/xla_flags.py, beside this script (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags.cpu(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

from jaxlm.interop import hf  # noqa: E402
from jaxlm.parallel.mesh import make_mesh  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "llama3")
assert jax.device_count() == 8 and jax.local_device_count() == 4
config = hf.read_config(FIXTURE)
config.mesh.update(data=1, fsdp=8)
config.train.batch_size = 8
mesh = make_mesh(config)
reads = []
model, _ = hf.load_model(FIXTURE, mesh=mesh, recorder=lambda name, index: reads.append([name, index]))

# Every shard this process holds against the same slice of a whole-tensor load on one local device.
whole, _ = hf.load_model(FIXTURE)
ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
shard_diff = 0.0
for path, var in nnx.to_flat_state(nnx.state(whole, nnx.Param)):
  reference = np.asarray(var.get_value())
  for shard in ours[path].get_value().addressable_shards:
    shard_diff = max(shard_diff, float(np.abs(np.asarray(shard.data) - reference[shard.index]).max()))

# The sharded model's logits, computed over both processes.
refs = np.load(os.path.join(FIXTURE, "refs.npz"))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
ids = jax.make_array_from_callback((1, len(refs["ids"])), replicated, lambda i: refs["ids"][None][i])
logits = jax.jit(lambda m, x: m(x), out_shardings=replicated)(model, ids)
logits_diff = float(np.abs(np.asarray(logits.addressable_data(0))[0] - refs["logits"]).max())

fsdp = list(mesh.axis_names).index("fsdp")
with open(f"{out}.{process_id}", "w") as f:
  json.dump({"reads": reads, "shard_diff": shard_diff, "logits_diff": logits_diff,
             "fsdp_process": [d.process_index for d in np.moveaxis(mesh.devices, fsdp, 0).reshape(8)]}, f)
jax.distributed.shutdown()
