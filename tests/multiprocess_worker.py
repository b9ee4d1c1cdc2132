"""One of two processes (4 simulated CPU devices each) training a tests/test_parallel.py layout.

  python tests/multiprocess_worker.py PROCESS_ID PORT MESH_JSON OUT_JSON [save|restore CKPT_DIR]

Run by test_parallel.py; process 0 writes the losses to OUT_JSON. Each process feeds only its own
rows of the batch (jax.make_array_from_process_local_data). `save`: after the STEPS steps, write a
checkpoint to CKPT_DIR, then run AFTER more steps. `restore`: restore CKPT_DIR (written under any
mesh and process count) instead of training from scratch, then run AFTER steps.
"""

import json
import os
import sys

import xla_flags  # tests/xla_flags.py, beside this script (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags.cpu(4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

process_id, port, mesh, out = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
mode, ckpt_dir = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else ("", "")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_parallel import AFTER, STEPS, packed_batch, tiny_config  # noqa: E402

from jaxlm.train.checkpoint import Checkpointer  # noqa: E402

from jaxlm.parallel.sharding import global_batch  # noqa: E402
from jaxlm.train.setup import init_sharded_state, jit_train_step, make_setup  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
c = tiny_config(**mesh)
setup = make_setup(c)
state = init_sharded_state(setup)
step = jit_train_step(setup)
# This process's rows: the ones its devices hold under the batch sharding (a contiguous block).
rows = setup.batch_sharding.addressable_devices_indices_map((c.train.batch_size, c.data.seq_len))
starts = sorted({idx[0].start or 0 for idx in rows.values()})
stops = sorted({idx[0].stop or c.train.batch_size for idx in rows.values()})
lo, hi = starts[0], stops[-1]
local = {k: v[lo:hi] for k, v in packed_batch(c).items()}
batch = global_batch(local, setup.batch_sharding)
losses, after = [], []
if mode == "restore":
  state = Checkpointer(ckpt_dir, c.checkpoint).restore(state)
else:
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
embed = multihost_utils.process_allgather(state.params["embed"].value, tiled=True)  # after STEPS
if mode == "save":
  saver = Checkpointer(ckpt_dir, c.checkpoint)
  saver.save(STEPS, state)
  saver.wait()
if mode:
  for _ in range(AFTER):
    state, metrics = step(state, batch)
    after.append(float(metrics["loss"]))
if process_id == 0:
  with open(out, "w") as f:
    json.dump({"losses": losses, "after": after, "rows": [lo, hi], "embed_sum": float(abs(embed).sum()),
               "mesh": dict(setup.mesh.shape),
               "data_of_process": [sorted({d.process_index for d in setup.mesh.devices[i].flat})
                                   for i in range(setup.mesh.shape["data"])]}, f)
jax.distributed.shutdown()
