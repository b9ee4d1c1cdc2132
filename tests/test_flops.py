"""Training FLOPs per token (by hand and against XLA's own count), the peak table, and the MFU log line."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.models import Transformer
from jaxlm.train import flops, optimizer
from jaxlm.train.loop import train
from jaxlm.train.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(**fields):
  m = base_config().model
  m.update(**fields)
  return m


def test_hand_count_of_a_small_config():
  m = model_config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  seq = 64
  # head_dim 16. Per layer: q 64x64, k and v 64x32 each, o 64x64 = 12,288 weights; SwiGLU
  # 3 x 64 x 128 = 24,576. Two layers: 73,728; output logits 64 x 512 = 32,768. Total 106,496.
  weights = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 64 * 512
  assert weights == 106_496 == flops.matmul_params(m)
  # Attention per layer and token: QK^T and PV, 2 FLOPs x 4 heads x 16 dims x 32 keys (half of 64,
  # causal) each = 4,096 + 4,096; two layers 16,384. Forward 2 x 106,496 + 16,384 = 229,376.
  forward = 2 * 106_496 + 2 * (2 * 2 * 4 * 16 * 32)
  assert flops.train_flops_per_token(m, seq) == 3 * forward == 688_128  # backward = 2 x forward
  # Without the causal half every query meets all 64 keys.
  assert flops.train_flops_per_token(m, seq, causal=False) == 3 * (2 * 106_496 + 2 * 2 * 2 * 4 * 16 * 64)


def test_sliding_window_counts_the_keys_in_the_window():
  m = model_config(sliding_window=4096)
  assert flops.attention_context(m, 4096) == 2048  # the window hides nothing: causal half
  assert flops.attention_context(m, 8192) == 4096 - 4096**2 / (2 * 8192)  # 3072
  exact = np.minimum(np.arange(8192) + 1, 4096).mean()  # keys each position really sees
  assert abs(flops.attention_context(m, 8192) / exact - 1) < 1e-3
  assert flops.attention_context(m, 8192, causal=False) == 8192  # a dense masked attention's work


def test_matches_xla_cost_analysis_within_10_percent():
  """XLA's count of the compiled train step against ours, with the convention XLA uses.

  A dense masked attention computes the whole score matrix, so XLA counts every (query, key) pair:
  we compare against causal=False. XLA also counts what we leave out (softmax, norms, the loss,
  AdamW), a few percent here because the matmuls dominate (d_model 256, MLP 1024, vocab 2048).
  Layers are unrolled: XLA's cost analysis counts a while loop's body (scan_layers) only once.
  """
  c = base_config()
  c.model.update(vocab_size=2048, d_model=256, num_layers=2, num_heads=4, num_kv_heads=4,
                 mlp_dim=1024, max_seq_len=128, scan_layers=False)
  b, t = 4, 128
  graphdef, params = nnx.split(Transformer(c.model, nnx.Rngs(0)), nnx.Param)
  tx = optimizer.make_optimizer(c.train)
  zeros = np.zeros((b, t), np.int32)
  batch = {"inputs": zeros, "targets": zeros, "segment_ids": zeros + 1, "weights": zeros + 1,
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
  compiled = jax.jit(make_train_step(graphdef, tx, c.train)).lower(init_state(params, tx, 0), batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_per_token = cost["flops"] / (b * t)
  ours = flops.train_flops_per_token(c.model, t, causal=False)
  assert abs(xla_per_token / ours - 1) < 0.10, (xla_per_token, ours)


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5p", 459), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("cpu", None),
])
def test_peak_table_by_device_kind(kind, tflops):
  assert flops.table_peak_tflops(kind) == tflops


def test_peak_on_cpu_is_measured_and_an_override_wins():
  assert flops.peak_tflops_per_device(123.0) == 123.0
  if jax.devices()[0].platform == "cpu":
    assert 0 < flops.peak_tflops_per_device() < 100  # a measured matmul rate, not a table entry


def test_default_cpu_job_logs_throughput_tflops_and_mfu(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("shakespeare", os.path.join(ROOT, "configs", "shakespeare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()  # the default job's model and batch, for 4 steps
  c.train.update(steps=4, warmup_steps=1, log_every=2, eval_batches=1, progress_bar=False,
                 workdir=str(tmp_path / "run"))
  c.tokenizer.update(cache_dir=str(tmp_path / "tokenizers"), train_max_bytes=1_000_000)
  train(c)
  out = capsys.readouterr().out
  line = next(l for l in out.splitlines() if l.startswith("step 2:"))
  assert "tok/s" in line and "TFLOP/s" in line and "MFU" in line, line
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f if "train/mfu" in l]
  assert rows and all(r["train/mfu"] > 0 and r["train/tokens_per_sec"] > 0 for r in rows)
  assert rows[0]["train/tokens_per_sec_per_device"] == rows[0]["train/tokens_per_sec"] / jax.device_count()
