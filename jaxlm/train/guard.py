"""The host side of the non-finite guard: which steps were skipped, and when to give up.

The decision itself is made inside the jitted step (jaxlm/train/step.py): a step whose loss,
gradient norm or update is not finite leaves the weights and optimizer state alone and reports
metrics["skipped"] = 1. Here each step's flag is read one step late: by then the device already has
the next step queued, so reading it never leaves the device idle. A skipped step is printed with
its step number and its place in the data stream; train.max_bad_steps skipped steps in a row stop
the run (NonFiniteError) with every checkpoint it wrote intact. Optionally a loss above
train.loss_spike_factor x the median of the last 100 steps is printed as a spike (nothing else).
"""

from __future__ import annotations

import collections
import statistics

import jax


class NonFiniteError(RuntimeError):
  """train.max_bad_steps steps in a row had a non-finite loss, gradient or update."""


class StepWatch:

  def __init__(self, train_cfg, rows_per_step: int, log):
    self.guard = train_cfg.skip_nonfinite
    self.max_bad = train_cfg.max_bad_steps
    self.spike_factor = train_cfg.loss_spike_factor
    self.rows = rows_per_step
    self.log = log
    self.skipped = 0  # steps not applied in this process's run so far
    self.spikes = 0
    self.streak = 0  # skipped steps in a row, up to the last one read
    self._recent = collections.deque(maxlen=100)
    self._pending = None  # (step, metrics) not read yet

  @property
  def active(self) -> bool:
    return self.guard or bool(self.spike_factor)

  def after(self, step: int, metrics) -> None:
    """Call after dispatching `step`: reads the step before it."""
    if not self.active:
      return
    pending, self._pending = self._pending, (step, metrics)
    if pending is not None:
      self._read(*pending)

  def flush(self) -> None:
    """Reads the last step (before a checkpoint, a log line or the end of the run)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._read(*pending)

  def _read(self, step: int, metrics) -> None:
    skipped, loss = jax.device_get((metrics.get("skipped", 0.0), metrics.get("loss")))
    if skipped:
      self.skipped += 1
      self.streak += 1
      self.log.print(
          f"step {step}: not applied (loss {float(loss) if loss is not None else 'n/a'}, a non-finite "
          f"loss, gradient or update); its data: batch {step} of the stream, rows "
          f"{(step - 1) * self.rows} to {step * self.rows - 1}; {self.streak} such step(s) in a row")
      if self.streak >= self.max_bad:
        raise NonFiniteError(
            f"{self.streak} steps in a row (up to step {step}) had a non-finite loss, gradient or "
            f"update (train.max_bad_steps={self.max_bad}); the weights are those of the last good "
            "step and every checkpoint is kept. Lower train.learning_rate, raise train.warmup_steps "
            "or set train.clip_norm, then resume from the last checkpoint")
      return
    self.streak = 0
    if loss is None or not self.spike_factor:
      return
    loss = float(loss)
    if len(self._recent) >= 10:
      median = statistics.median(self._recent)
      if loss > self.spike_factor * median:
        self.spikes += 1
        self.log.print(f"step {step}: loss spike: {loss:.4f} is over {self.spike_factor:g} x the "
                       f"median of the last {len(self._recent)} steps ({median:.4f})")
    self._recent.append(loss)
