"""Where metrics go: a console progress bar, a JSONL file and TensorBoard event files.

Only the loop calls this (side effects stay out of the jitted math). Values arrive as host floats.
"""

from __future__ import annotations

import json
import os
import sys

import tqdm
from tensorboardX import SummaryWriter


class MetricsLogger:

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress_bar: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                          dynamic_ncols=True, disable=not progress_bar, file=sys.stdout)

  def advance(self, steps: int = 1):
    self._bar.update(steps)

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    """Logs a dict of floats under `prefix/` to every sink; train metrics also update the bar."""
    record = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), step)
    if prefix == "train":
      tps, per_device = metrics["tokens_per_sec"], metrics["tokens_per_sec_per_device"]
      rate = f"{tps:,.0f} tok/s" + (f" ({per_device:,.0f}/device)" if per_device < tps else "")
      summary = (f"loss {metrics['loss']:.3f} | {rate} | {metrics['tflops_per_sec']:.3f} TFLOP/s | "
                 f"MFU {100 * metrics['mfu']:.1f}%")
      if self._bar.disable:  # no bar to carry it: one line per log step instead
        self.print(f"step {step}: {summary}")
      else:
        self._bar.set_postfix_str(summary, refresh=False)
    else:
      self.print(f"step {step} {prefix}: " + ", ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()))

  def print(self, text: str):
    self._bar.write(text, file=sys.stdout)

  def close(self):
    self._bar.close()
    self._jsonl.close()
    self._tb.close()
