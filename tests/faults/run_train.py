"""`python -m jaxlm.train` with one fault injected: the trainer under test, as a subprocess.

  python tests/faults/run_train.py [FAULT OPTIONS] -- --config=configs/tiny.py --config.x=y ...

Everything after `--` goes to the trainer unchanged. The options patch the trainer from outside
(jaxlm has no fault hooks of its own):
  --devices N          simulated CPU devices in this process
  --fast_compile       compile at LLVM level 0 as pytest does (tests/xla_flags.py)
  --slow S             sleep S seconds after every step (an external signal then lands mid-run)
  --sigterm_at K       send this process SIGTERM right after dispatching step K (mid-step)
  --nan_at K           step K's batch carries a NaN loss weight (weights are float at every step)
  --inf_lr_at K        step K's update is multiplied by an infinite learning rate
  --kill_in_save_at K  SIGKILL this process right after the checkpoint save of step K starts
  --full_disk_at K     every file write of step K's checkpoint fails with ENOSPC (disk full)
It prints `first step after start: T s` when the first step it runs has finished (T from start).
A multi-process run is started like a user would by hand: JAXLM_DISTRIBUTED=1 with
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment.
"""

import argparse
import errno
import dataclasses
import os
import signal
import sys
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(argv):
  cut = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser()
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--slow", type=float, default=0.0)
  p.add_argument("--fast_compile", action="store_true")
  for name in ("sigterm_at", "nan_at", "inf_lr_at", "kill_in_save_at", "full_disk_at"):
    p.add_argument(f"--{name}", type=int, default=0)
  return p.parse_args(argv[:cut]), argv[cut + 1:]


def main():
  a, trainer_argv = parse(sys.argv[1:])
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import xla_flags  # tests/xla_flags.py (imports no jax)
  os.environ["XLA_FLAGS"] = xla_flags.cpu(a.devices) if a.fast_compile else (
      f"--xla_force_host_platform_device_count={a.devices}")
  # torch (the optional bench extra) is imported by tensorboardX only if installed, ~10 s a process
  # on a busy CI core; the trainer never uses it. Blocked, the import fails as in a base install.
  sys.modules["torch"] = None
  import jax
  import jax.numpy as jnp
  import optax

  from jaxlm.train import __main__ as cli
  from jaxlm.train import checkpoint, loop

  jit_train_step = loop.jit_train_step
  seen = {"first": False}

  def infinite_lr(tx):
    """tx with every update multiplied by an infinite learning rate (same optimizer state)."""
    def update(grads, state, params=None):
      updates, state = tx.update(grads, state, params)
      return jax.tree.map(lambda u: u * jnp.inf, updates), state
    return optax.GradientTransformation(tx.init, update)

  def patched_jit(setup, *args, **kwargs):
    step_fn = jit_train_step(setup, *args, **kwargs)
    if a.inf_lr_at:  # a second program, used for step inf_lr_at only
      bad_fn = jit_train_step(dataclasses.replace(setup, tx=infinite_lr(setup.tx)), *args, **kwargs)

    def run(state, batch, *rest):
      step = int(state.step) + 1
      if a.nan_at:  # float weights at every step: one compile, and a NaN at step nan_at
        batch = dict(batch)
        w = jnp.asarray(batch["weights"], jnp.float32)
        if step == a.nan_at:
          w = w.at[0, 0].set(jnp.nan)
        batch["weights"] = jax.device_put(w, batch["inputs"].sharding)
      out = (bad_fn if step == a.inf_lr_at else step_fn)(state, batch, *rest)
      if step == a.sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      if not seen["first"]:
        jax.block_until_ready(out)
        seen["first"] = True
        print(f"first step after start: {time.perf_counter() - START:.2f} s", flush=True)
      if a.slow:
        time.sleep(a.slow)
      return out
    return run

  loop.jit_train_step = patched_jit

  if a.kill_in_save_at:
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
      save(self, step, *args, **kwargs)
      if step == a.kill_in_save_at:
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save_then_die

  if a.full_disk_at:
    from faults import inject
    save = checkpoint.Checkpointer.save

    def save_on_full_disk(self, step, *args, **kwargs):
      if step != a.full_disk_at:
        return save(self, step, *args, **kwargs)
      with inject.failing_writes(errno.ENOSPC, match=f"/checkpoints/{step}"):
        save(self, step, *args, **kwargs)
        self.wait()  # an async save fails in its background thread: while the disk is still full
    checkpoint.Checkpointer.save = save_on_full_disk

  sys.argv = ["jaxlm.train", *trainer_argv]
  cli.run()


if __name__ == "__main__":
  main()
