"""for_decoding: unstacked layers and an untied output projection compute the same model."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.inference.decode import generate_batch, lower_decoding
from jaxlm.inference.layout import for_decoding
from jaxlm.models.compute import Compute
from jaxlm.models.transformer import Transformer


MLA = dict(attention_kind="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=6)


def tiny(scan_layers, tie, score=0, **fields):
  c = base_config().model
  # 2 layers: an unstacked model's program grows with each layer, and 2 already tell layers apart
  c.vocab_size, c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim = 100, 2, 32, 2, 1, 64
  c.tie_embeddings = tie
  if fields.get("attention_kind") == "mla":
    c.num_kv_heads = c.num_heads
  c.update(fields)
  return nnx.split(Transformer(c, nnx.Rngs(0), Compute(scan_layers=scan_layers), score_outputs=score))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens):
  """The logits as one compiled program (op-by-op dispatch of a model is slower on CPU)."""
  return nnx.merge(graphdef, params)(tokens)


@functools.partial(jax.jit, static_argnums=0)
def scores(graphdef, params, tokens):
  return nnx.merge(graphdef, params).logits_and_scores(tokens)[1]


@pytest.mark.fast
# Each case compiles two decoding programs. The mla case unstacks and unties a scanned tied model,
# the whole conversion, so a standard-attention scanned_tied case added nothing to it: standard
# attention is in the three other cases, each conversion step (unstacking, untying) on its own.
@pytest.mark.parametrize("scan_layers,tie,fields", [(True, False, {}), (False, True, {}),
                                                    (True, True, MLA)],
                         ids=["scanned_untied", "unrolled_tied", "scanned_tied_mla"])
def test_same_logits_and_greedy_tokens_in_the_decoding_layout(scan_layers, tie, fields):
  graphdef, params = tiny(scan_layers, tie, **fields)
  new_def, new_params = for_decoding(graphdef, params)
  model = nnx.merge(new_def, new_params)
  assert not model.compute.scan_layers and not model.cfg.tie_embeddings
  assert len(model.blocks) == 2 and model.unembed[...].shape == (32, 100)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 9)))
  want = forward(graphdef, params, tokens)
  np.testing.assert_allclose(forward(new_def, new_params, tokens), want, rtol=0, atol=1e-5)
  prompts = [np.arange(1, 8), np.arange(3, 5), np.array([9])]
  a = generate_batch(graphdef, params, prompts, max_new_tokens=12)
  b = generate_batch(new_def, new_params, prompts, max_new_tokens=12)
  for x, y, lx, ly in zip(a.tokens, b.tokens, a.logprobs, b.logprobs):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(lx, ly, atol=1e-5)


@pytest.mark.fast
def test_the_decoding_layout_is_returned_as_is_and_keeps_a_score_head():
  graphdef, params = tiny(False, False)
  assert for_decoding(graphdef, params) == (graphdef, params)
  graphdef, params = tiny(True, True, score=1)
  new_def, new_params = for_decoding(graphdef, params)
  tokens = jnp.zeros((1, 4), jnp.int32)
  want = scores(graphdef, params, tokens)
  np.testing.assert_allclose(scores(new_def, new_params, tokens), want, atol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("fields", [{}, MLA], ids=["attention", "mla"])
def test_the_decode_loop_copies_no_kv_cache(fields):
  """In the decoding layout each layer writes its new entries into its own cache buffer and then
  reads it, so the loop updates the buffers in place. (A stacked cache read beside its write was
  copied out per layer, and the whole stack twice a step.)"""
  graphdef, params = for_decoding(*tiny(True, True, **fields))
  prompts = [np.arange(1, 20)] * 4  # batch 4, 24 slots (prompt 19 -> 24, 8 steps -> cache 32)
  text = lower_decoding(graphdef, params, prompts, max_new_tokens=8).compile().as_text()
  body = re.search(r"while\(.*?body=(%[\w.\-]+)", text).group(1)
  computation = re.search(re.escape(body) + r" .*?\{\n(.*?)\n\}", text, re.S).group(1)
  copies = re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", computation)
  sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in copies]
  smallest_cache = 4 * 32 * 4  # batch x slots x the narrowest entry (MLA's 4-wide RoPE key)
  assert "scatter" in computation  # the cache is written in the loop ...
  assert all(n < smallest_cache for n in sizes), copies  # ... and never copied
