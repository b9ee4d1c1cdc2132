"""One of two processes (4 simulated CPU devices each) continuing a tests/test_stream_resume.py run.

  python tests/stream_resume_worker.py PROCESS_ID PORT WORKDIR STOP_AT_STEP

Resumes the run in WORKDIR (written by one process of 8 devices) with jaxlm's training loop, trains
to STOP_AT_STEP and checkpoints there; each process feeds its own rows of every global batch.
"""

import os
import sys

import xla_flags  # tests/xla_flags.py, beside this script (imports no jax)

os.environ["XLA_FLAGS"] = xla_flags.cpu(4)
os.environ["JAX_PLATFORMS"] = "cpu"
# torch (the optional bench extra) is imported by tensorboardX only if installed, ~10 s a process
# on a busy CI core; training never uses it. Blocked, the import fails as in a base install.
sys.modules["torch"] = None

import jax  # noqa: E402

process_id, port, workdir, stop_at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_stream_resume import resume_config  # noqa: E402

from jaxlm.train.loop import train  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
train(resume_config(workdir), stop_at_step=stop_at)
jax.distributed.shutdown()
