"""Preemption: SIGTERM or SIGINT ends training at a step boundary with a checkpoint of that step.

Cloud TPU maintenance events and preemptible VMs, SLURM's preemption and `kill` all send SIGTERM
first; Ctrl-C sends SIGINT. Either one makes the loop save the current step, wait for the save to
finish and raise Preempted; `python -m jaxlm.train` then exits with PREEMPTED_EXIT_CODE, which the
launchers in launch/ treat as "requeue". Nothing is lost: the checkpoint is the step just finished,
and resuming continues the same run bit for bit.

One process: a Python handler sets a flag the loop reads after every step. Several processes: each
must save the same step, so JAX's preemption sync point decides (jax.distributed installs its own
SIGTERM handler and agrees on the step with every process over the coordination service); SIGINT
is turned into SIGTERM so Ctrl-C takes the same path. A second SIGINT still interrupts at once.
"""

from __future__ import annotations

import contextlib
import os
import signal

import jax
from jax.experimental import multihost_utils

from jaxlm.checkpoint_health import CheckpointError
from jaxlm.train.guard import NonFiniteError

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL ("try again later"): requeue and resume


class Preempted(Exception):
  """The run stopped on a signal after checkpointing `step`."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {step} saved")
    self.step, self.signal_name = step, signal_name


class PreemptionWatch:
  """Installs the signal handlers on creation (main thread only); `reached(step)` after each step."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.received: str | None = None
    self._old = {}
    wanted = (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)
    for sig in wanted:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (a notebook's worker thread): no handlers
        pass

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received == "SIGINT" and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.received = name
    if self.multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to jax.distributed's handler, which syncs the step

  def reached(self, step: int) -> bool:
    """True when the run should checkpoint `step` and stop (every process agrees on the step)."""
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "SIGTERM"
        return True
      return False
    return self.received is not None

  def close(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


@contextlib.contextmanager
def stopping_cleanly(log, checkpointer):
  """Around a training loop: yields its PreemptionWatch. A run that stops (Preempted, NonFiniteError)
  closes its log and waits for the checkpoints it wrote before the error leaves; a failed save
  (checkpoint.on_save_error=stop) closes the log. The signal handlers are restored either way."""
  preemption = PreemptionWatch()
  try:
    yield preemption
  except (Preempted, NonFiniteError) as stop:
    log.print(f"jaxlm: {stop}")
    log.close()
    checkpointer.wait()  # the checkpoints written so far are complete before the process exits
    checkpointer.close()
    raise
  except CheckpointError:  # keep what was logged
    log.close()
    raise
  finally:
    preemption.close()
