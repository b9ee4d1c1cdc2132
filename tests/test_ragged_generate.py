"""Batches of prompts of different lengths: every row decodes exactly as it would alone, stops on
its own (eos, stop sequences, its own max_new_tokens), and the same holds sharded over a mesh.

The model is tiny and built once per module; init_std is raised so attention is far from uniform
and a position or masking bug would change the greedy tokens.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config, parse_rules
from jaxlm.inference import decode
from jaxlm.inference.decode import bucket, generate_batch
from jaxlm.models import build_model
from jaxlm.parallel.mesh import make_mesh
from jaxlm.parallel.sharding import tree_shardings

VOCAB = 97
LENGTHS = (1, 40, 7, 23, 2, 31, 15, 9)  # 8 prompts, 1 to 40 tokens


def tiny_config():
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = VOCAB, 64, 2, 8, 8
  m.mlp_dim, m.max_seq_len, m.init_std = 128, 96, 0.3
  return c


@pytest.fixture(scope="module")
def model():
  return nnx.split(build_model(tiny_config(), seed=3))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, n).astype(np.int32) for n in LENGTHS]


@pytest.fixture(scope="module")
def alone(model, prompts):
  """Each prompt generated on its own: the reference every batched row must reproduce."""
  return [generate_batch(*model, [p], max_new_tokens=12 + i) for i, p in enumerate(prompts)]


@pytest.mark.fast
def test_buckets():
  assert [bucket(n) for n in (1, 8, 9, 40, 64, 65)] == [8, 8, 16, 64, 64, 128]
  assert bucket(3, 1, 4) == 4 and bucket(5, 1, 4) == 8 and bucket(5, 1, 6) == 12


def test_each_row_of_a_ragged_batch_decodes_as_it_would_alone(model, prompts, alone):
  limits = [12 + i for i in range(len(prompts))]  # each row its own max_new_tokens
  batched = generate_batch(*model, prompts, max_new_tokens=limits)
  for i, one in enumerate(alone):
    np.testing.assert_array_equal(batched.tokens[i], one.tokens[0])
    assert len(batched.tokens[i]) == limits[i] and batched.finish[i] == "length"
    np.testing.assert_allclose(batched.logprobs[i], one.logprobs[0], atol=1e-5, rtol=0)
    assert np.all(batched.logprobs[i] < 0)


def test_log_probs_are_the_models_own(model, prompts, alone):
  """logprobs[j] = log softmax of the full forward's logits at the token before it."""
  graphdef, params = model
  p, new = prompts[2], alone[2].tokens[0]
  seq = np.concatenate([p, new])[None]
  logits = jax.jit(lambda pr, x: nnx.merge(graphdef, pr)(x))(params, seq)[0]
  want = jax.nn.log_softmax(logits[len(p) - 1:-1], -1)[np.arange(len(new)), new]
  np.testing.assert_allclose(alone[2].logprobs[0], want, atol=1e-5, rtol=0)


def test_rows_stop_at_eos_and_at_stop_sequences(model, prompts, alone):
  # Row 0 ends at the end of a stop sequence taken from its own continuation (tokens 3..5), row 1
  # at the first occurrence of an eos id taken from its continuation (token 6); the others run on.
  stop = list(alone[0].tokens[0][3:6])
  eos = int(alone[1].tokens[0][6])
  out = generate_batch(*model, prompts[:3], max_new_tokens=12, eos_id=eos, stop_sequences=[stop, [VOCAB + 5]])
  for row in range(3):
    full = alone[row].tokens[0][:12]
    ends = []
    if row == 0:
      ends.append((next(j for j in range(2, 12) if list(full[j - 2:j + 1]) == stop) + 1, "stop"))
    if eos in full:
      ends.append((list(full).index(eos) + 1, "eos"))
    n, reason = min(ends, default=(12, "length"))
    np.testing.assert_array_equal(out.tokens[row], full[:n])
    assert out.finish[row] == reason, (row, out.finish[row], reason)
  assert out.finish[0] == "stop" and len(out.tokens[0]) <= 6
  assert out.finish[1] == "eos" and out.tokens[1][-1] == eos


def test_requests_of_similar_sizes_reuse_one_program(model, prompts):
  before = decode.compiled_programs()
  generate_batch(*model, [prompts[0], prompts[2]], max_new_tokens=5)  # width 8, batch 2, 8 steps
  generate_batch(*model, [prompts[2][:3], prompts[2][:6]], max_new_tokens=7)
  assert decode.compiled_programs() == before + 1


def test_bad_requests_are_refused_by_name(model, prompts):
  with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
    generate_batch(*model, [prompts[0], prompts[1]], max_new_tokens=[4, 60])
  with pytest.raises(ValueError, match="at least one token"):
    generate_batch(*model, [[]], max_new_tokens=4)
  with pytest.raises(ValueError, match="stop sequence is empty"):
    generate_batch(*model, [prompts[0]], max_new_tokens=4, stop_sequences=[[]])


@pytest.mark.parametrize("layout", [dict(tensor=2, fsdp=4, data=1), dict(tensor=8, data=1)],
                         ids=["tp2-fsdp4", "tp8"])
def test_sharded_decoding_gives_the_single_device_tokens(model, prompts, alone, layout):
  graphdef, params = model
  config = tiny_config()
  config.mesh.update(**layout)
  mesh = make_mesh(config)
  rules = parse_rules(config.mesh.rules)
  sharded = jax.device_put(params, tree_shardings(params, mesh, rules))
  out = generate_batch(graphdef, sharded, prompts, max_new_tokens=[12 + i for i in range(8)],
                       mesh=mesh, rules=rules)
  for i, one in enumerate(alone):
    np.testing.assert_array_equal(out.tokens[i], one.tokens[0])
  q = sharded["blocks"]["attn"]["q"][...]  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape[2] == 8 // layout["tensor"]
