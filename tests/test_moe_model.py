"""MoE layers inside the Transformer and the train step: mixed dense/MoE segments, scanned or not,
KV-cached decoding, router losses and load metrics, the DeepSeek-V3 bias update, and a tiny MoE
config trained by the loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import presets
from jaxlm.config import ConfigError, base_config, validate
from jaxlm.models import Transformer, build_model, moe
from jaxlm.models.compute import Compute
from jaxlm.train import optimizer
from jaxlm.train.loop import train
from jaxlm.train.step import init_state, make_train_step


def moe_config(**model):
  c = base_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=16, moe_num_experts=4, moe_experts_per_token=2, moe_mlp_dim=32)
  c.model.update(**model)
  c.tokenizer.vocab_size = 64
  c.data.seq_len = 16
  c.train.update(batch_size=4, steps=30, warmup_steps=2, learning_rate=1e-2, weight_decay=0.0)
  return c


def _unstack(stacked: dict) -> dict:
  """A scanned model's pure parameter dict laid out as the unscanned model's."""
  out = dict(stacked)
  for name in ("blocks", "moe_blocks"):
    if name in out:
      n = jax.tree.leaves(out[name])[0].shape[0]
      out[name] = {i: jax.tree.map(lambda a: a[i], out[name]) for i in range(n)}
  return out


def test_mixed_segments_scanned_unrolled_and_cached_agree():
  # layer i >= 1 is MoE when (i - 1 + 1) % 2 == 0: layers 0, 1, 3 dense, layer 2 MoE, so the dense
  # stack runs in two slices around the MoE one
  m = moe_config(moe_first_dense_layers=1, moe_every=2, moe_router="sigmoid",
                 moe_shared_experts=1).model
  scanned = Transformer(m, nnx.Rngs(0), Compute())
  assert scanned.segments() == ((False, 0, 2, 0), (True, 2, 1, 0), (False, 3, 1, 2))
  unrolled = Transformer(m, nnx.Rngs(0), Compute(scan_layers=False))
  state = nnx.state(unrolled, nnx.Param)
  nnx.replace_by_pure_dict(state, _unstack(nnx.to_pure_dict(nnx.state(scanned, nnx.Param))))
  nnx.update(unrolled, state)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)

  # Compiled rather than op by op (one program instead of hundreds of tiny ones); the statistics
  # are collected inside the traced function, as collect_stats asks.
  @nnx.jit
  def forward_and_load(model, tokens):
    with moe.collect_stats() as stats:
      logits = model(tokens)
    return logits, stats["load"]

  la, load_a = forward_and_load(scanned, tokens)
  lb, load_b = forward_and_load(unrolled, tokens)
  np.testing.assert_allclose(la, lb, atol=2e-5)
  assert load_a.shape == (1, 4) and float(load_a.sum()) == 2 * 8 * 2
  np.testing.assert_allclose(load_a, load_b)
  # prefill 5 tokens, then one at a time: the cached logits are the full forward's
  cached = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache))
  cache = scanned.init_cache(2, 8)
  first, cache = cached(scanned, tokens[:, :5], cache)
  steps = [first]
  for i in range(5, 8):
    out, cache = cached(scanned, tokens[:, i:i + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), la, atol=2e-5)


@pytest.mark.fast
def test_dense_models_keep_their_parameters():
  c = moe_config(moe_num_experts=0)
  params = nnx.to_pure_dict(nnx.state(build_model(c), nnx.Param))
  assert "moe_blocks" not in params and jax.tree.leaves(params["blocks"])[0].shape[0] == 4
  c = moe_config()  # every layer MoE: no dense stack at all
  params = nnx.to_pure_dict(nnx.state(build_model(c), nnx.Param))
  assert "blocks" not in params
  assert params["moe_blocks"]["mlp"]["up"].shape == (4, 4, 32, 32)  # [layers, experts, embed, mlp]


def _batch(c, seed=0):
  rng = np.random.default_rng(seed)
  b, t = c.train.batch_size, c.data.seq_len
  tokens = rng.integers(0, c.model.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "weights": np.ones((b, t), np.int32)}


def test_train_step_minimizes_router_terms_reports_load_and_moves_the_bias():
  c = moe_config(moe_router="sigmoid", moe_first_dense_layers=1)
  c.train.moe_bias_rate = 0.01
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optimizer.make_optimizer(c.train)
  state = init_state(params, tx, 0)
  step = jax.jit(make_train_step(graphdef, tx, c.train))
  batch = _batch(c)
  losses = []
  for _ in range(c.train.steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.6 * losses[0], losses
  for name in ("moe/balance_loss", "moe/router_z_loss", "moe/max_over_mean", "moe/dropped",
               "moe/tokens_per_expert", "moe/layer2/max_over_mean", "moe/layer2/min_over_mean",
               "moe/layer2/max_tokens", "moe/layer2/dropped"):
    assert np.isfinite(float(metrics[name])), name
  assert "moe/layer3/dropped" not in metrics  # 3 MoE layers (1 dense first): layer0..layer2
  assert float(metrics["moe/dropped"]) == 0  # dropless
  # 4 x 16 tokens x 2 choices over 4 experts
  np.testing.assert_allclose(float(metrics["moe/tokens_per_expert"]), 32)
  bias = nnx.to_pure_dict(state.params)["moe_blocks"]["mlp"]["router_bias"]  # [3, 4]
  assert bias.shape == (3, 4) and float(jnp.abs(bias).max()) > 0  # moved by the rule alone
  np.testing.assert_allclose(np.abs(bias) / 0.01 % 1, 0, atol=1e-4)  # whole multiples of the rate


def test_gradient_accumulation_with_moe_matches_one_batch():
  import optax  # noqa: PLC0415
  c = moe_config(moe_first_dense_layers=2)
  # The balance loss multiplies two means over the tokens a layer sees, so it is a per-micro-batch
  # quantity (accumulation averages it); the z-loss and the load are per-token sums and add exactly.
  c.train.moe_balance_loss = 0.0
  batch = _batch(c)
  out = []
  for accum in (1, 2):
    c.train.grad_accum_steps = accum
    graphdef, params = nnx.split(build_model(c), nnx.Param)
    tx = optax.sgd(0.5)
    step = jax.jit(make_train_step(graphdef, tx, c.train))
    state, metrics = step(init_state(params, tx, 0), batch)
    out.append((state, metrics))
  (one, m1), (two, m2) = out
  # routing is per token, so each micro-batch routes as the whole batch does
  for name in ("loss", "moe/router_z_loss", "moe/layer0/max_tokens", "moe/layer1/min_over_mean"):
    np.testing.assert_allclose(float(m1[name]), float(m2[name]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("field, value, message", [
    ("moe_experts_per_token", 5, "exceeds model.moe_num_experts"),
    ("moe_groups", 3, "model.moe_groups"),
    ("moe_first_dense_layers", 4, "no layer is MoE"),
    ("moe_router", "relu", "model.moe_router"),
    ("moe_capacity_factor", -1.0, "model.moe_capacity_factor"),
    ("mlp_bias", True, "model.mlp_bias"),
])
def test_bad_moe_fields_are_named(field, value, message):
  c = moe_config()
  c.model[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)


@pytest.mark.fast
def test_pipeline_stages_refuse_mixed_dense_and_moe_layers():
  c = moe_config()
  c.mesh.stage = 2
  validate(c)  # every layer MoE: one stack of alike blocks, which stages split
  c.model.moe_first_dense_layers = 1
  with pytest.raises(ConfigError, match="mixes dense and MoE layers.*mesh.stage=1"):
    validate(c)


def test_tiny_moe_config_trains(tmp_path):
  """A few steps of configs/tiny.py with MoE layers through the training loop: the loss falls and
  the router metrics reach metrics.jsonl."""
  c = presets.load("tiny").get_config()
  c.model.update(moe_num_experts=4, moe_experts_per_token=2, moe_mlp_dim=64, moe_first_dense_layers=1)
  c.train.update(steps=20, log_every=5, workdir=str(tmp_path), progress_bar=False)
  c.checkpoint.async_save = False
  train(c)
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  logged = [l for l in lines if "train/loss" in l]
  assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.5, logged
  for name in ("moe/balance_loss", "moe/router_z_loss", "moe/max_over_mean", "moe/dropped",
               "moe/layer0/max_over_mean"):
    assert np.isfinite(logged[-1][f"train/{name}"]), name
  # the balance over each 5-step window: at least 1, at most all tokens on one expert in a layer
  for line in logged:
    worst = line["train/moe/window_max_over_mean"]
    assert worst == line["train/moe/layer0/window_max_over_mean"]  # the one MoE layer (of 2)
    assert 1 <= worst <= 4
  assert "train/moe/expert_load" not in logged[-1]
  assert any("eval/bits_per_byte" in l for l in lines)
