"""Sequence parallelism with flash attention: each of 4 sequence shards computes only its own
queries' attention (a quarter of the row's work, balanced across shards), and training matches
one device.

Work is counted from the kernel calls the sharded step makes: each shard runs the flash kernel on
its two chunks of queries (jaxlm/parallel/sequence.py) with their offsets, and
`jaxlm.kernels.attention_work` counts the (query block, key block) pairs such a call visits, the
kernel grid steps that do work.
"""

import jax
import numpy as np
import pytest

from jaxlm.kernels import attention_work
from jaxlm.models import attention_kernels
from jaxlm.parallel import sequence
from test_parallel import packed_batch, run, tiny_config

SEQ, BLOCK, SHARDS = 128, 16, 4


def flash_config(**mesh):
  c = tiny_config(**mesh)
  c.model.max_seq_len = c.data.seq_len = SEQ
  c.compute.update(attention="flash", flash_block_q=BLOCK, flash_block_k=BLOCK)
  return c


@pytest.fixture(scope="module")
def one_device():
  # XLA attention: the interpreted flash kernel runs one device's whole grid serially (minutes on
  # CPU), and flash equals XLA attention to float32 rounding (tests/test_flash_model.py).
  c = flash_config()
  c.compute.attention = "xla"
  return run(c, devices=jax.devices()[:1])


def test_each_shard_computes_a_quarter_of_the_attention_and_training_matches_one_device(
    one_device, monkeypatch):
  calls = []
  real = attention_kernels.flash_attention

  def recording(q, k, v, *args, q_offset=None, **kwargs):
    calls.append((q.shape, k.shape, q_offset))
    return real(q, k, v, *args, q_offset=q_offset, **kwargs)

  monkeypatch.setattr(attention_kernels, "flash_attention", recording)
  got = run(flash_config(data=2, sequence=SHARDS))
  np.testing.assert_allclose(got["losses"], one_device["losses"], rtol=1e-5)

  # Traced once per layer (2, unrolled into the scan body once): 2 chunk calls of SEQ / 8 rows
  # each against all SEQ keys, each with a traced offset, per trace.
  chunk = SEQ // (2 * SHARDS)
  assert calls and all(q[1] == chunk and k[1] == SEQ and off is not None for q, k, off in calls)

  whole = attention_work(SEQ, SEQ, block_q=BLOCK, block_k=BLOCK, backend="interpret")
  per_shard = [sum(attention_work(chunk, SEQ, block_q=BLOCK, block_k=BLOCK, backend="interpret",
                                  q_offset=int(start))
                   for start in sequence.chunk_starts(SEQ, SHARDS, j)) for j in range(SHARDS)]
  print(f"\nattention block pairs: one device {whole}, per sequence shard {per_shard} "
        f"({[round(w / whole, 3) for w in per_shard]} of one device)")
  assert sum(per_shard) == whole
  assert per_shard == [whole // SHARDS] * SHARDS  # balanced: each shard exactly a quarter


@pytest.mark.fast
def test_balanced_order_gives_each_shard_an_early_and_a_late_chunk():
  order = sequence.balanced_order(16, 4)  # chunks of 2
  np.testing.assert_array_equal(order, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
  assert sorted(order) == list(range(16))
  with pytest.raises(ValueError, match="2 x 4 equal chunks"):
    sequence.balanced_order(12, 4)
  batch = packed_batch(tiny_config())
  permuted = sequence.permute_batch(batch, sequence.balanced_order(16, 2))
  np.testing.assert_array_equal(np.sort(permuted["inputs"], 1), np.sort(batch["inputs"], 1))
