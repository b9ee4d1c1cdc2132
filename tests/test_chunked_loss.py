"""train.loss_chunk: the head and cross-entropy run over pieces of the sequence
(jaxlm/train/chunked_loss.py) and give the unchunked loss and gradients, on one device and on a
mesh that shards the vocabulary (tensor) and the sequence; the whole batch's logits are never
held, in the forward or the backward (the compiled program's temporaries say so)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.models import Transformer
from jaxlm.parallel.sharding import global_batch
from jaxlm.train.chunked_loss import chunked_cross_entropy, strided_chunks
from jaxlm.train.setup import (abstract_state, forward_fn, init_sharded_state, jit_train_step,
                               make_setup, with_rules)
from jaxlm.train.step import loss_sums

B, T = 3, 16


def model_cfg(**overrides):
  m = base_config().model
  m.lock()
  m.update(vocab_size=97, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, mlp_dim=48,
           max_seq_len=T)
  m.update(overrides)
  return m


def batch(vocab, float_weights=False, seed=0):
  """Two documents in some rows, padding (weight 0) at the end of others, random or 0/1 weights."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (B, T + 1)).astype(np.int32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[0, 7:] = 2
  segment_ids[1, -5:] = 0  # padding
  positions = np.where(segment_ids == 2, np.arange(T) - 7, np.arange(T)).astype(np.int32)
  weights = (segment_ids > 0).astype(np.float32)
  if float_weights:
    weights = weights * rng.uniform(0.2, 2.0, (B, T)).astype(np.float32)
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "segment_ids": jnp.asarray(segment_ids), "positions": jnp.asarray(positions),
          "weights": jnp.asarray(weights)}


def rel(a, b) -> float:
  """||a - b|| / ||b|| (b the unchunked reference)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loss_and_grads(graphdef, params, b, z_loss, chunk):
  def loss(p):
    nll, z, count = loss_sums(graphdef, p, b, z_loss, chunk=chunk)
    return (nll + z) / count, (nll, z, count)
  return jax.value_and_grad(loss, has_aux=True)(params)


CASES = {  # name: (model overrides, z_loss, float weights, tokens per piece: 16 // it pieces)
    "untied": (dict(tie_embeddings=False), 0.0, False, 1),
    "tied_z_loss": (dict(tie_embeddings=True), 1e-2, False, 4),
    "float_weights": (dict(tie_embeddings=False), 1e-3, True, 8),
    "softcap": (dict(final_logit_softcap=5.0), 1e-2, True, 4),
    "padded_vocab": (dict(vocab_multiple=32), 1e-2, True, 2),  # 97 ids in 128 rows, 31 masked
}


FAST = ("tied_z_loss", "padded_vocab")  # in the fast tier; CI runs all five


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.fast) if n in FAST else n
                                  for n in CASES])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(name):
  overrides, z_loss, float_weights, chunk = CASES[name]
  cfg = model_cfg(**overrides)
  graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
  b = batch(cfg.vocab_size, float_weights)
  both = jax.jit(lambda p, b: (loss_and_grads(graphdef, p, b, z_loss, 0),
                               loss_and_grads(graphdef, p, b, z_loss, chunk)))
  ((want, want_sums), want_grads), ((got, got_sums), got_grads) = both(params, b)
  assert want_sums[2] == float(jnp.sum(b["weights"]))
  if z_loss:
    assert want_sums[1] > 0  # the z term is really in the compared loss
  assert rel(got, want) <= 1e-6, (chunk, float(got), float(want))
  for g, w in zip(got_sums, want_sums):
    assert rel(g, w) <= 1e-6, (chunk, got_sums, want_sums)
  leaves = jax.tree_util.tree_leaves_with_path(want_grads)
  assert len(leaves) == len(jax.tree.leaves(got_grads))
  for (path, w), g in zip(leaves, jax.tree.leaves(got_grads)):
    assert np.linalg.norm(np.asarray(w)) > 0, path  # every parameter gets a gradient
    assert rel(g, w) <= 1e-6, (chunk, jax.tree_util.keystr(path), rel(g, w))


@pytest.mark.fast
def test_strided_chunks_cover_every_position_once():
  a = jnp.arange(2 * 12).reshape(2, 12)
  pieces = strided_chunks(a, 4)  # [3 pieces, 2 rows, 4]
  assert pieces.shape == (3, 2, 4)
  np.testing.assert_array_equal(pieces[1, 0], [1, 4, 7, 10])  # piece j: positions j, j + 3, ...
  np.testing.assert_array_equal(np.sort(np.moveaxis(np.asarray(pieces), 0, 2).reshape(2, 12)),
                                np.asarray(a))
  with pytest.raises(ValueError, match="divide"):
    chunked_cross_entropy(lambda x: x, jnp.zeros((1, 12, 4)), a[:1], a[:1], 0.0, 5)


@pytest.mark.fast
def test_loss_chunk_must_divide_the_sequence():
  c = base_config()
  c.data.seq_len = 100
  c.model.max_seq_len = 128
  c.train.loss_chunk = 30
  with pytest.raises(ConfigError, match="train.loss_chunk"):
    validate(c)
  c.train.loss_chunk = -1
  with pytest.raises(ConfigError, match="train.loss_chunk"):
    validate(c)
  c.train.loss_chunk = 25
  validate(c)


def test_the_train_step_never_holds_the_whole_batch_logits():
  """A vocabulary large enough that the logits dwarf everything else: the compiled train step's
  temporaries hold the whole [batch, seq, vocab] float32 logits without chunking; with
  train.loss_chunk (8 pieces) they drop by at least that much and are smaller than the logits."""
  logits_bytes, temporaries = 0, {}
  for chunk in (0, 8):
    c = config(vocab_size=8192, d_model=16, num_heads=2, num_kv_heads=1, mlp_dim=16, seq_len=64)
    c.train.update(batch_size=4, loss_chunk=chunk)
    setup = make_setup(validate(c), jax.devices()[:1])
    rows, t = c.train.batch_size, c.data.seq_len
    b = {k: jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=setup.batch_sharding)
         for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
    compiled = jit_train_step(setup).lower(abstract_state(setup), b).compile()
    temporaries[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = rows * t * c.model.vocab_size * 4
  whole, chunked = temporaries[0], temporaries[8]
  print(f"\ntemporaries: {whole / 2**20:.1f} MiB unchunked, {chunked / 2**20:.1f} MiB in 8 pieces; "
        f"logits {logits_bytes / 2**20:.1f} MiB")
  assert whole >= logits_bytes  # the logits (and their gradient) are there without chunks
  assert chunked < logits_bytes and whole - chunked >= logits_bytes  # at least their share goes


def config(seq_len=T, **model):
  c = base_config()
  c.model.update(vocab_size=128, d_model=32, num_layers=1, num_heads=8, num_kv_heads=4, mlp_dim=64,
                 max_seq_len=seq_len)
  c.model.update(model)
  c.tokenizer.vocab_size = c.model.vocab_size
  c.data.seq_len = seq_len
  c.train.update(batch_size=8, steps=10, warmup_steps=0)
  return c


@pytest.mark.parametrize("mesh", [dict(data=2, tensor=2, sequence=2), dict(stage=2, data=2, tensor=2)],
                         ids=["dp2_tp2_sp2", "pp2_dp2_tp2"])
def test_vocab_and_sequence_shards_give_the_unchunked_loss_and_gradients(mesh):
  """8 devices, the mesh-aware forward (pipeline stages for pp2), the rules table active: the
  logits are sharded over vocab (tensor) and the sequence or the rows; the chunked loss and every
  gradient equal the unchunked ones."""
  c = config(final_logit_softcap=10.0, num_layers=2)
  c.mesh.update(**mesh)
  setup = make_setup(validate(c))
  params = init_sharded_state(setup).params
  b = {k: np.asarray(v) for k, v in batch(128, float_weights=True).items()}
  b = global_batch({k: np.concatenate([v, v[::-1], v[:2]]) for k, v in b.items()}, setup.batch_sharding)
  forward = forward_fn(setup)

  def loss_and_grads(params, b, chunk):
    def loss(p):
      nll, z, count = loss_sums(setup.graphdef, p, b, 1e-3, forward, chunk=chunk)
      return (nll + z) / count
    return jax.value_and_grad(loss)(params)

  both = jax.jit(with_rules(lambda p, b: (loss_and_grads(p, b, 0), loss_and_grads(p, b, 4)), setup))
  (want, want_grads), (got, got_grads) = jax.device_get(both(params, b))
  assert rel(got, want) <= 1e-6, (got, want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
    assert np.linalg.norm(w) > 0 and rel(g, w) <= 1e-6, (jax.tree_util.keystr(path), rel(g, w))
