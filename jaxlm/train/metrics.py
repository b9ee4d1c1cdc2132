"""Where metrics go: a console progress bar, a JSONL file and TensorBoard event files.

Only the loop calls this (side effects stay out of the jitted math). Values arrive as host floats.

In a gs:// run directory (jaxlm/workdir.py) an object can be neither appended to nor flushed in
place, and tensorboardX writes gs:// only through a client of its own: both files are written in a
local folder (metrics.jsonl starting from the run's copy, so a resumed run appends to it) and copied
up whole through etils.epath by `sync`: when a checkpoint is saved, at most every `sync_secs` of
logging, and at close. A process killed between syncs loses in the bucket only what it logged since
the last one.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

import tqdm
from etils import epath
from tensorboardX import SummaryWriter

from jaxlm.workdir import as_path, is_url


class MetricsLogger:

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress_bar: bool = True,
               sync_secs: float = 60.0):
    self._root = as_path(workdir)
    self._root.mkdir(parents=True, exist_ok=True)
    self._staging = tempfile.mkdtemp(prefix="jaxlm-metrics-") if is_url(workdir) else None
    local = self._root if self._staging is None else epath.Path(self._staging)
    if self._staging is not None and (self._root / "metrics.jsonl").exists():
      (local / "metrics.jsonl").write_bytes((self._root / "metrics.jsonl").read_bytes())
    self._sync_secs, self._synced_at = sync_secs, time.monotonic()
    self._jsonl = (local / "metrics.jsonl").open("a")
    # tensorboardX names an events file by the second it opened; in a bucket, where each sync
    # rewrites the file whole, a restart within that second would replace the earlier file.
    suffix = "" if self._staging is None else f".from_step_{start_step}"
    self._tb = SummaryWriter(str(local / "tensorboard"), filename_suffix=suffix)
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
    if time.monotonic() - self._synced_at >= self._sync_secs:
      self.sync()
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

  def sync(self):
    """Copies the staged files into a gs:// run directory (a local one is written in place)."""
    self._synced_at = time.monotonic()
    if self._staging is None:
      return
    self._tb.flush()
    local = epath.Path(self._staging)
    (self._root / "metrics.jsonl").write_bytes((local / "metrics.jsonl").read_bytes())
    for events in (local / "tensorboard").iterdir():
      (self._root / "tensorboard" / events.name).write_bytes(events.read_bytes())

  def close(self):
    self._bar.close()
    self._jsonl.close()
    self._tb.close()
    if self._staging is not None:
      self.sync()
      shutil.rmtree(self._staging, ignore_errors=True)
