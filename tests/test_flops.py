"""Training FLOPs per token (by hand and against XLA's own count), the peak table, and the MFU log line."""

import json
import os
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import presets
from jaxlm.config import base_config
from jaxlm.models import build_model
from jaxlm.train import flops, optimizer
from jaxlm.train.loop import train
from jaxlm.train.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(**fields):
  m = base_config().model
  m.update(**fields)
  return m


@pytest.mark.fast
def test_hand_count_of_a_small_config():
  m = model_config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  # head_dim 16. Per layer: q 64x64 = 4,096, k and v 64x32 = 2,048 each, o 64x64 = 4,096: 12,288;
  # SwiGLU 3 x 64 x 128 = 24,576. Two layers: 2 x 36,864 = 73,728; output logits 64 x 512 = 32,768.
  assert flops.matmul_params(m) == 106_496
  # Attention per layer and token: QK^T and PV, each 2 FLOPs x 4 heads x 16 dims x 32 keys (half of
  # 64, causal) = 4,096; two layers 16,384. Forward 2 x 106,496 + 16,384 = 229,376; training is
  # 3 x forward (backward = 2 x forward) = 688,128.
  assert flops.train_flops_per_token(m, 64) == 688_128
  # Without the causal half every query meets all 64 keys: attention 2 x 2 x 2 x 4 x 16 x 64 = 32,768,
  # forward 212,992 + 32,768 = 245,760, training 737,280.
  assert flops.train_flops_per_token(m, 64, causal=False) == 737_280


@pytest.mark.fast
def test_moe_counts_active_parameters():
  """Routed experts count only the top-k a token uses, plus the shared experts and the router."""
  dense = model_config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128)
  m = model_config(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                   moe_num_experts=8, moe_experts_per_token=2, moe_mlp_dim=64)
  # Both layers MoE: 2 x 3 x 64 x 64 = 24,576 active expert parameters (the dense MLP's count) and a
  # router of 64 x 8 = 512 per layer; the other 6 experts of each layer are not counted.
  assert flops.matmul_params(m) == flops.matmul_params(dense) + 2 * 512
  m.moe_first_dense_layers, m.moe_shared_experts = 1, 1  # layer 0 dense, layer 1 MoE with 1 shared
  # layer 1: router 512 + (2 routed + 1 shared) x 3 x 64 x 64 = 36,864
  assert flops.matmul_params(m) == flops.matmul_params(dense) + 512 + 3 * 64 * 64
  # A model's active parameters, counted from its arrays: all but 6 of the 8 experts per MoE layer.
  m.vocab_size, m.tie_embeddings = 512, False
  model = nnx.state(build_model(SimpleNamespace(model=m, compute=base_config().compute,
                                                lora=base_config().lora,
                                                posttrain=base_config().posttrain)), nnx.Param)
  p = nnx.to_pure_dict(model)
  total = sum(x.size for x in jax.tree.leaves(p))
  norms = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(p) if "norm" in str(path))
  idle = 6 * 3 * 64 * 64  # the unused experts of the one MoE layer
  assert total - norms - idle - m.vocab_size * m.d_model == flops.matmul_params(m)


@pytest.mark.fast
def test_sliding_window_counts_the_keys_in_the_window():
  m = model_config(sliding_window=4096)
  assert flops.attention_context(m, 4096) == 2048  # the window hides nothing: causal half
  # Rows of 8192: query i sees min(i + 1, 4096) keys. The first 4096 see 1..4096 (sum 4096 x 4097 / 2),
  # the other 4096 see 4096 each: mean (8,390,656 + 16,777,216) / 8192 = 3072.25. The convention
  # counts the triangle as a half (4096^2 / 2), so 3072: within 1e-4 of the exact count.
  exact = np.minimum(np.arange(8192) + 1, 4096).mean()
  assert exact == 3072.25
  assert flops.attention_context(m, 8192) == 3072
  assert flops.attention_context(m, 8192, causal=False) == 8192  # a dense masked attention's work


def xla_train_flops_per_token(c, b: int, t: int) -> float:
  """XLA's FLOP count of config c's compiled train step on a [b, t] batch, per token (layers must be
  unrolled: cost analysis counts a scanned loop's body once)."""
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optimizer.make_optimizer(c.train)
  zeros = np.zeros((b, t), np.int32)
  batch = {"inputs": zeros, "targets": zeros, "segment_ids": zeros + 1, "weights": zeros + 1,
           "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
  compiled = jax.jit(make_train_step(graphdef, tx, c.train)).lower(init_state(params, tx, 0), batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / (b * t)


def test_matches_xla_cost_analysis_within_10_percent():
  """XLA's count of the compiled train step against ours, with the convention XLA uses.

  A dense masked attention computes the whole score matrix, so XLA counts every (query, key) pair:
  we compare against causal=False. XLA also counts what we leave out (softmax, norms, the loss,
  AdamW), a few percent here because the matmuls dominate (d_model 256, MLP 1024, vocab 2048).
  Layers are unrolled: XLA's cost analysis counts a while loop's body (scan_layers) only once.
  """
  c = base_config()
  c.model.update(vocab_size=2048, d_model=256, num_layers=2, num_heads=4, num_kv_heads=4,
                 mlp_dim=1024, max_seq_len=128)
  c.compute.scan_layers = False
  xla_per_token = xla_train_flops_per_token(c, 4, 128)
  ours = flops.train_flops_per_token(c.model, 128, causal=False)
  assert abs(xla_per_token / ours - 1) < 0.10, (xla_per_token, ours)


@pytest.mark.fast
def test_peak_is_the_override_else_the_chip_table_else_a_cpu_measurement(monkeypatch):
  assert flops.peak_tflops_per_device(123.0) == 123.0
  if jax.devices()[0].platform == "cpu":
    # Every entry of jaxlm.chips.CHIPS is >= 100 TFLOP/s (tests/test_chips.py): below is a measurement.
    assert 0 < flops.peak_tflops_per_device() < 100
  monkeypatch.setattr(jax, "devices", lambda: [SimpleNamespace(device_kind="NVIDIA H100 PCIe")])
  assert flops.peak_tflops_per_device() == 756  # the PCIe card's spec sheet, not the SXM's 989


def test_default_cpu_job_logs_throughput_tflops_and_mfu(tmp_path, capsys):
  c = presets.load("shakespeare").get_config()  # the default job's model and batch, for 4 steps
  c.train.update(steps=4, warmup_steps=1, log_every=2, eval_batches=1, progress_bar=False,
                 workdir=str(tmp_path / "run"), peak_tflops=2.0)
  c.tokenizer.update(cache_dir=str(tmp_path / "tokenizers"), train_max_bytes=1_000_000)
  start = time.perf_counter()
  train(c)
  wall = time.perf_counter() - start
  out = capsys.readouterr().out
  # Shakespeare's model: d_model 256, 4 layers of 4 heads (head_dim 64, no GQA), SwiGLU 768, vocab
  # 4096, rows of 256 tokens. Per layer q/k/v/o 4 x 256^2 = 262,144 and MLP 3 x 256 x 768 = 589,824;
  # 4 layers 3,407,872 + logits 256 x 4096 = 1,048,576: 4,456,448 matmul weights. Attention: 4 layers
  # x 2 products x 2 FLOPs x 4 heads x 64 x 128 keys (causal half of 256) = 524,288. Training:
  # 3 x (2 x 4,456,448 + 524,288) = 28,311,552 FLOPs a token.
  flops_per_token = 28_311_552
  devices = 8  # tests/conftest.py simulates 8 CPU devices; the 2.0 TFLOP/s peak is per device
  assert "28.3 MFLOP per token, peak 16.000 TFLOP/s over 8 device(s)" in out
  line = next(l for l in out.splitlines() if l.startswith("step 2:"))
  assert "tok/s" in line and "TFLOP/s" in line and "MFU" in line, line
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f if "train/mfu" in l]
  assert [r["step"] for r in rows] == [2, 4]
  for r in rows:
    rate = r["train/tokens_per_sec"]
    # Each window is 2 steps x 8 rows x 256 tokens and lies inside the timed call.
    assert rate >= 4096 / wall
    assert r["train/tflops_per_sec"] == pytest.approx(rate * flops_per_token / 1e12)
    assert r["train/mfu"] == pytest.approx(rate * flops_per_token / 1e12 / (2.0 * devices))
    assert r["train/tokens_per_sec_per_device"] == pytest.approx(rate / devices)
