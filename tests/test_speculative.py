"""Speculative decoding: greedy output is the target's greedy output, and sampled output follows
the target's distribution (a chi-square test that also catches a deliberately wrong rule)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jaxlm.config import base_config
from jaxlm.inference.decode import generate_batch
from jaxlm.inference.speculative import accept, speculative_batch
from jaxlm.models import build_model


def tiny(vocab, layers, seed, init_std=0.3, d_model=64):
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = vocab, d_model, layers, 4, 2
  m.mlp_dim, m.max_seq_len, m.init_std = 2 * d_model, 128, init_std
  return nnx.split(build_model(c, seed=seed))


@pytest.fixture(scope="module")
def target():
  return tiny(61, 4, seed=0)


def test_greedy_speculative_output_is_the_targets_greedy_output(target):
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 61, n) for n in rng.integers(1, 30, 50)]  # 50 prompts, 1-29 tokens
  want = generate_batch(*target, prompts, max_new_tokens=20)
  for draft, k in ((tiny(61, 1, seed=7), 4), (target, 3)):  # a weak draft, and a perfect one
    got, st = speculative_batch(target, draft, prompts, k=k, max_new_tokens=20)
    for i in range(len(prompts)):
      np.testing.assert_array_equal(got.tokens[i], want.tokens[i])
      # verification scores k + 1 positions in one pass where decoding scores one: other sums,
      # 1.02e-5 measured with the tests' LLVM level-0 compile (tests/conftest.py)
      np.testing.assert_allclose(got.logprobs[i], want.logprobs[i], atol=2e-5, rtol=0)
    if draft is target:
      assert st.acceptance == 1.0
  assert 0 < st.rounds < 20


def test_greedy_rows_stop_on_eos_inside_a_round(target):
  prompts = [[5, 9, 2], [1]]
  want = generate_batch(*target, prompts, max_new_tokens=16)
  eos = int(want.tokens[0][5])
  want = generate_batch(*target, prompts, max_new_tokens=16, eos_id=eos)
  got, _ = speculative_batch(target, target, prompts, k=4, max_new_tokens=16, eos_id=eos)
  for i in range(2):
    np.testing.assert_array_equal(got.tokens[i], want.tokens[i])
    assert got.finish[i] == want.finish[i]


def _exact_pairs(model, prompt, vocab):
  """The target's exact joint probability of its first two new tokens: [vocab, vocab]."""
  graphdef, params = model
  forward = jax.jit(lambda p, x: jax.nn.softmax(nnx.merge(graphdef, p)(x)[:, -1], -1))
  first = np.asarray(forward(params, jnp.asarray([prompt])))[0]  # [vocab]
  seconds = np.asarray(forward(params, jnp.asarray([prompt + [t] for t in range(vocab)])))
  return first[:, None] * seconds  # [vocab, vocab]


def _chi_square_p(model, draft, rule, prompt, vocab, n, seed, exact):
  """exact: _exact_pairs(model, prompt, vocab), computed once for both rules."""
  got, _ = speculative_batch(model, draft, [prompt] * n, k=2, max_new_tokens=2,
                             key=jax.random.key(seed), temperature=1.0, rule=rule)
  pairs = np.stack([t[:2] for t in got.tokens])  # [n, 2]
  observed = np.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab)
  expected = exact.astype(np.float64).reshape(-1) * n
  keep = expected >= 5  # pool the rare cells, as the test requires
  obs = np.append(observed[keep], observed[~keep].sum())
  exp = np.append(expected[keep], expected[~keep].sum())
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sampled_tokens_follow_the_targets_distribution():
  vocab = 6
  model, draft = tiny(vocab, 2, seed=3, init_std=0.5), tiny(vocab, 1, seed=11, init_std=0.5)
  prompt = [1, 4, 2]

  def accept_all(p, q, drafts, u):  # a wrong rule: every draft token kept
    k = drafts.shape[1]
    return jnp.full((drafts.shape[0],), k, jnp.int32), p[:, k]

  exact = _exact_pairs(model, prompt, vocab)
  good = _chi_square_p(model, draft, accept, prompt, vocab, 6000, seed=0, exact=exact)
  bad = _chi_square_p(model, draft, accept_all, prompt, vocab, 6000, seed=0, exact=exact)
  print(f"\nchi-square p-values: standard rule {good:.3f}, accept-all rule {bad:.2e}")
  assert good > 1e-3
  assert bad < 1e-6


def test_a_draft_with_another_vocabulary_is_refused(target):
  with pytest.raises(ValueError, match="draft's vocabulary"):
    speculative_batch(target, tiny(50, 1, seed=0), [[1, 2]], k=2, max_new_tokens=4)
