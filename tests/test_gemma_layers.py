"""Gemma's model features, local and global layers (model.layer_pattern) above all: every layer
loop (scanned, unscanned, pipeline stages), attention path (xla, blocked xla, flash, splash) and
KV-cache decoding computes the same model. Parity with transformers is tests/test_hf.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_parallel import STEPS, packed_batch, run, tiny_config

from jaxlm.config import ConfigError, base_config, layer_kinds, validate
from jaxlm.models import Compute, build_model
from jaxlm.models.layers import Norm
from jaxlm.train import flops, optimizer
from jaxlm.train.step import init_state, make_train_step

# Gemma 2's alternation (4 layers: each pipeline stage holds one L and one G) and Gemma 3's 5 local
# then 1 global (6 layers: stage 0 holds LLL, stage 1 LLG, so a stage given the other's kinds shows).
PATTERNS = {
    "gemma2": dict(num_layers=4, layer_pattern="LG", attn_logit_softcap=5.0, final_logit_softcap=10.0),
    "gemma3": dict(num_layers=6, layer_pattern="LLLLLG", qk_norm=True, rope_theta=10000.0,
                   rope_scaling="linear", rope_scaling_factor=2.0, rope_local_theta=100.0),
}


def gemma_config(name, **changes):
  """test_parallel's tiny config (rows of 16 tokens, 8 rows) as a Gemma model with a 4-token window."""
  c = tiny_config()
  c.model.update(sliding_window=4, mlp_kind="geglu", post_norms=True, norm_plus_one=True,
                 scale_embeddings=True, query_pre_attn_scalar=3.0, init_std=0.1, **PATTERNS[name])
  c.model.update(**changes)
  c.compute.pipeline_microbatches = 2
  c.train.eps = 1e-6  # as tests/test_pipeline.py: bounds Adam's amplification of rounding
  return validate(c)


def unscanned_losses(c, scanned_params, batch):
  """test_parallel.run's steps on one device with unstacked layers, from the same parameters."""
  c = c.copy_and_resolve_references()
  c.compute.scan_layers = False
  graphdef, target = nnx.split(build_model(c), nnx.Param)
  pure = nnx.to_pure_dict(scanned_params)
  pure["blocks"] = {i: jax.tree.map(lambda a: a[i], pure["blocks"]) for i in range(c.model.num_layers)}
  nnx.replace_by_pure_dict(target, pure)
  tx = optimizer.make_optimizer(c.train)
  state, step = init_state(target, tx, c.train.seed), jax.jit(make_train_step(graphdef, tx, c.train))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses)


# One training case (three compiled train steps, over a minute of CPU per pattern in CI) with both
# patterns' features: Gemma 3's pattern, whose stages hold different kinds (LLL, LLG), is the
# stricter test of the layer loops; Gemma 2's softcaps ride along. Gemma 2's own pattern still runs
# in every attention path below.
def test_layer_patterns_train_alike_scanned_unscanned_and_pipelined():
  name = "gemma3"
  softcaps = dict(attn_logit_softcap=PATTERNS["gemma2"]["attn_logit_softcap"],
                  final_logit_softcap=PATTERNS["gemma2"]["final_logit_softcap"])
  reference = run(gemma_config(name, **softcaps), devices=jax.devices()[:1])
  scanned = reference["losses"]
  unscanned = unscanned_losses(gemma_config(name, **softcaps), reference["init"],
                               packed_batch(gemma_config(name, **softcaps)))
  c = gemma_config(name, **softcaps)
  c.mesh.update(stage=2, data=4)
  piped = run(c)["losses"]  # 8 simulated devices: 2 stages x 4 data
  print(f"\n{name}: losses {scanned}, unscanned {np.abs(unscanned / scanned - 1).max():.1e}, "
        f"pipelined {np.abs(piped / scanned - 1).max():.1e} relative")
  np.testing.assert_allclose(unscanned, scanned, rtol=1e-5)
  np.testing.assert_allclose(piped, scanned, rtol=1e-5)


def _logits(c, tokens, segments=None):
  model = build_model(c, seed=1)
  return np.asarray(nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segments))


VARIANTS = {  # compute fields; splash needs rows of whole 128-token blocks
    "blocked": dict(attention_blocks=3),
    "flash": dict(attention="flash", flash_block_q=16, flash_block_k=8),
    "flash unscanned": dict(attention="flash", flash_block_q=16, flash_block_k=8, scan_layers=False),
    "splash": dict(attention="splash", flash_block_q=128, flash_block_k=128),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_attention_path_runs_each_layers_own_kind(name):
  """Blocked xla and the kernels take a static window: scanned layers choose theirs by lax.cond."""
  references = {}  # the xla logits by (length, scan_layers): blocked and flash share theirs
  for variant, compute in VARIANTS.items():
    length = 128 if variant == "splash" else 37  # 37: masked tails in the flash blocks
    c = gemma_config(name, max_seq_len=length)
    c.compute.scan_layers = compute.get("scan_layers", True)  # the reference's layers are alike
    tokens = jax.random.randint(jax.random.key(0), (2, length), 0, c.model.vocab_size)
    segments = jnp.asarray(np.repeat([[1] * 20 + [2] * (length - 20)], 2, 0), jnp.int32)
    key = (length, c.compute.scan_layers)
    if key not in references:
      references[key] = _logits(c, tokens, segments)
    reference = references[key]
    if variant == "blocked":  # the pattern matters: every layer global computes another model
      every_global = gemma_config(name, max_seq_len=length, layer_pattern="G", rope_local_theta=0.0)
      assert np.abs(_logits(every_global, tokens, segments) - reference).max() > 1e-3
    c.compute.update(**compute)
    diff = float(np.abs(_logits(c, tokens, segments) - reference).max())
    print(f"\n{name} {variant}: max |logit difference| {diff:.1e}")
    assert diff <= 1e-5, variant


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_the_full_forward(scan):
  c = gemma_config("gemma3", max_seq_len=32)
  c.compute.scan_layers = scan
  model = build_model(c, seed=2)
  tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, c.model.vocab_size)
  full = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
  step = nnx.jit(lambda m, t, cache: m(t, cache=cache))
  logits, cache = step(model, tokens[:, :10], model.init_cache(2, 24))  # prefill 10, then one by one
  got = [np.asarray(logits)]
  for i in range(10, 24):
    logits, cache = step(model, tokens[:, i:i + 1], cache)
    got.append(np.asarray(logits))
  diff = float(np.abs(np.concatenate(got, axis=1) - full).max())
  print(f"\nscan={scan}: cached decoding vs full forward, max |logit difference| {diff:.1e}")
  assert diff <= 1e-5


@pytest.mark.fast
def test_layer_pattern_is_cyclic_and_validated():
  m = base_config().model
  m.update(num_layers=7, layer_pattern="LLLLLG", sliding_window=8)
  assert layer_kinds(m) == (True,) * 5 + (False, True)
  m.layer_pattern = ""
  assert layer_kinds(m) is None
  for changes, message in [
      (dict(layer_pattern="LX", sliding_window=8), r"model.layer_pattern.*'LX'.*L \(local"),
      (dict(layer_pattern="LG"), r"model.layer_pattern.*model.sliding_window is 0"),
      (dict(rope_local_theta=100.0), r"model.rope_local_theta.*no local \(L\) layer"),
      (dict(query_pre_attn_scalar=-1.0), r"model.query_pre_attn_scalar.*>= 0"),
  ]:
    c = base_config()
    c.model.update(**changes)
    with pytest.raises(ConfigError, match=message):
      validate(c)


@pytest.mark.fast
def test_norm_plus_one_stores_w_and_scales_by_one_plus_w():
  m = base_config().model
  m.norm_plus_one = True
  norm = Norm(m, Compute(), 32, nnx.Rngs(0))
  assert not np.any(np.asarray(norm.scale[...]))  # w = 0 at init: the identity scale
  x = jax.random.normal(jax.random.key(0), (3, 32))
  norm.scale[...] = jnp.full((32,), 0.5)
  rms = np.sqrt(np.mean(np.square(np.asarray(x)), -1, keepdims=True) + m.norm_eps)
  np.testing.assert_allclose(norm(x), 1.5 * np.asarray(x) / rms, rtol=1e-5)


@pytest.mark.fast
def test_flops_count_the_window_only_on_local_layers():
  m = base_config().model
  m.update(vocab_size=256, num_layers=4)
  full = flops.train_flops_per_token(m, 8192)
  m.sliding_window = 1024
  windowed = flops.train_flops_per_token(m, 8192)  # every layer
  assert windowed < full
  m.layer_pattern = "LG"
  assert flops.train_flops_per_token(m, 8192) == pytest.approx((full + windowed) / 2)
  m.layer_pattern = "G"
  assert flops.train_flops_per_token(m, 8192) == full
