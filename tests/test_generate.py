"""Generation: KV-cache decoding matches the full forward pass, greedy `generate` matches a no-cache
argmax loop, sampling filters only emit allowed tokens, eos is sticky, too-long requests fail,
and the `jaxlm.generate` CLI applies its flags over the run's saved sample settings.

Models are tiny (the shared one is built once per module); init_std is raised so attention is far
from uniform and a cache or masking bug shows up well above the float32 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlm.config import base_config
from jaxlm.inference.decode import check_length, generate, generate_text, output_lengths
from jaxlm.inference.sampling import filter_logits, sample_token
from jaxlm.models import build_model

pytestmark = pytest.mark.fast  # unit tests: the `-m fast` tier

VOCAB = 64
PROMPT_LEN, TOTAL_LEN = 5, 14


def tiny_config(**overrides):
  """A full config of a tiny model; overrides name model or compute fields."""
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = VOCAB, 32, 2, 4, 2  # GQA
  m.mlp_dim, m.max_seq_len, m.init_std = 64, 64, 0.2
  for k, v in overrides.items():
    (c.compute if k in c.compute else m)[k] = v
  return c


_forward = jax.jit(lambda graphdef, params, tokens: nnx.merge(graphdef, params)(tokens),
                   static_argnums=0)  # [batch, t] -> [batch, t, vocab]


def cached_logits(graphdef, params, tokens, prompt_len):
  """tokens: [batch, T]. Prefill tokens[:, :prompt_len], then feed the rest one at a time."""

  @jax.jit
  def run(params, tokens):
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    prefill, cache = model(tokens[:, :prompt_len], cache=cache)  # [batch, p, vocab]

    def step(cache, token):  # token: [batch]
      logits, cache = model(token[:, None], cache=cache)
      return cache, logits[:, 0]

    cache, steps = jax.lax.scan(step, cache, tokens[:, prompt_len:].T)  # [T - p, batch, vocab]
    return jnp.concatenate([prefill, steps.transpose(1, 0, 2)], axis=1), cache["index"]

  return run(params, tokens)


@pytest.fixture(scope="module")
def model():
  """The default tiny model (scanned layers, full attention, GQA), split for functional use."""
  return nnx.split(build_model(tiny_config()))


def random_tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, jnp.int32)


# --- KV cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(scan_layers=True),
    dict(scan_layers=True, sliding_window=3),
    dict(scan_layers=False, sliding_window=3, position_kind="learned"),
], ids=["scan", "scan-window", "unrolled-window-learned"])
def test_kv_cache_decoding_matches_full_forward(overrides):
  graphdef, params = nnx.split(build_model(tiny_config(**overrides), seed=1))
  tokens = random_tokens(0, (2, TOTAL_LEN))
  full = _forward(graphdef, params, tokens)  # [batch, T, vocab]
  cached, index = cached_logits(graphdef, params, tokens, PROMPT_LEN)
  np.testing.assert_array_equal(index, TOTAL_LEN)  # every row's cache index
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)


# --- generate -------------------------------------------------------------------------------------
# Shapes and settings are shared between tests so `generate` compiles only three programs.

N_NEW = TOTAL_LEN - PROMPT_LEN
SAMPLE_T = 1.5


def argmax_loop(graphdef, params, prompt, n):
  """Reference greedy decoding with no cache: a full forward over a fixed-size buffer per token.

  The buffer's unfilled tail is never seen by earlier positions (causal attention), so one
  compiled shape serves every step.
  """
  b, p = prompt.shape
  buf = jnp.zeros((b, p + n), jnp.int32).at[:, :p].set(prompt)
  for t in range(p, p + n):
    logits = _forward(graphdef, params, buf)  # [batch, p + n, vocab]
    buf = buf.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1))
  return np.asarray(buf[:, p:])


def test_greedy_generate_matches_argmax_over_full_forward(model):
  graphdef, params = model
  prompt = random_tokens(1, (2, PROMPT_LEN))
  out = generate(graphdef, params, prompt, max_new_tokens=N_NEW, key=None)
  assert out.shape == (2, N_NEW) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, argmax_loop(graphdef, params, prompt, N_NEW))


@pytest.mark.parametrize("row, step", [(0, 3), (1, 0)], ids=["mid-way", "first-token"])
def test_rows_keep_emitting_eos_after_eos(model, row, step):
  """Pick as eos the token a free run emits at (row, step); the rerun with the same key must
  agree with the free run up to each row's first eos, then repeat eos. eos_id is traced, so
  both cases share one compiled program."""
  graphdef, params = model
  prompt = random_tokens(2, (2, PROMPT_LEN))
  kw = dict(max_new_tokens=N_NEW, key=jax.random.key(7), temperature=SAMPLE_T)
  free = np.asarray(generate(graphdef, params, prompt, **kw))
  eos = int(free[row, step])
  out = np.asarray(generate(graphdef, params, prompt, eos_id=eos, **kw))
  lengths = output_lengths(out, eos)
  assert lengths[row] <= step + 1
  for r in range(out.shape[0]):
    stop = lengths[r]
    np.testing.assert_array_equal(out[r, :stop], free[r, :stop])  # identical until eos
    assert (out[r, stop:] == eos).all()


def test_generate_refuses_sequences_longer_than_max_seq_len(model):
  graphdef, params = model
  prompt = random_tokens(3, (1, 10))
  with pytest.raises(ValueError, match=r"model\.max_seq_len"):
    generate(graphdef, params, prompt, max_new_tokens=64 - 10 + 1, key=None)
  check_length(64, 10, 64 - 10)  # exactly max_seq_len fits


class _ToyTokenizer:
  """One character per token (chr(ord('0') + id)); bos decodes to nothing, eos is visible (as
  some tokenizers render it), so text past eos would show."""
  bos_id = 0

  def __init__(self, eos_id):
    self.eos_id = eos_id

  def encode(self, text):
    return [ord(ch) - ord("0") for ch in text]

  def decode(self, ids):
    return "".join(chr(ord("0") + i) for i in ids if i != self.bos_id)


def sampled_ids(graphdef, params, tok, prompt, seed):
  """Reference: what `generate` samples for [bos] + prompt with no eos."""
  ids = jnp.asarray([[tok.bos_id] + tok.encode(prompt)])
  out = generate(graphdef, params, ids, max_new_tokens=N_NEW, key=jax.random.key(seed),
                 temperature=SAMPLE_T)
  return [int(i) for i in out[0]]


def test_generate_text_returns_continuation_up_to_eos(model):
  """eos is set to a token that an eos-free run with the same key first emits at step k >= 2, so
  the text must be exactly the k tokens before it."""
  graphdef, params = model
  prompt = "abcd"  # PROMPT_LEN tokens with bos
  ids = sampled_ids(graphdef, params, _ToyTokenizer(None), prompt, seed=5)
  k = next(i for i in range(2, N_NEW) if ids[i] not in ids[:i] + [0])
  cfg = base_config().sample
  cfg.max_new_tokens, cfg.temperature = N_NEW, SAMPLE_T
  text = generate_text((graphdef, params), _ToyTokenizer(ids[k]), prompt, cfg, jax.random.key(5))
  assert text and text == _ToyTokenizer(None).decode(ids[:k])


def test_cli_flags_override_the_saved_sample_config(model, monkeypatch, capsys):
  """`python -m jaxlm.generate`: flags given replace the run's sample settings, others are kept.

  load_params is replaced by the tiny model, so this checks the CLI, not checkpoints (see
  tests/test_load_params.py for the CLI on real run directories).
  """
  from absl import flags
  from absl.testing import flagsaver

  import jaxlm.generate as cli
  from jaxlm import runs

  graphdef, params = model
  config = base_config()
  config.sample.prompt, config.sample.temperature, config.sample.max_new_tokens = "z", 0.0, N_NEW
  tok = _ToyTokenizer(None)
  monkeypatch.setattr(runs, "load_params",
                      lambda workdir, step: runs.LoadedParams(graphdef, params, config, tok, step))
  with flagsaver.flagsaver():
    flags.FLAGS(["generate", "--workdir=unused", f"--temperature={SAMPLE_T}", "--prompt=wxyz",
                 "--seed=3"])
    cli.main(["generate"])
  expected = "wxyz" + tok.decode(sampled_ids(graphdef, params, tok, "wxyz", seed=3))
  assert capsys.readouterr().out == expected + "\n"
  assert config.sample.temperature == 0.0  # the saved config is not modified


# --- sampling filters -----------------------------------------------------------------------------

def allowed_np(logits, temperature, top_k, top_p, min_p, slack):
  """Independent float64 reference of the filters on one row; slack widens (> 0) or narrows
  (< 0) the top_p / min_p thresholds to bracket float32 rounding at the boundary."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones(x.shape, bool)
  if top_k:
    keep &= x >= np.sort(x)[-top_k]
  if top_p < 1:  # ties are decided on logits: float64 probs of logits 1e-35 apart are equal
    xm = np.where(keep, x, -np.inf)
    order = np.argsort(-xm, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(_softmax_np(xm)[order])[:-1]])
    keep &= xm >= xm[order][before < top_p + slack].min()
  if min_p:
    p = _softmax_np(np.where(keep, x, -np.inf))
    keep &= p >= (min_p - slack) * p.max()
  return keep


def _softmax_np(x):
  e = np.exp(x - x.max())
  return e / e.sum()


# Eager on purpose: a jitted version would recompile for every new (static) filter setting, while
# eager dispatch reuses each op's compiled kernel across settings.
_sample_many = jax.vmap(sample_token, in_axes=(0, None, None, None, None, None))  # keys: [n] -> [n, batch]

row_values = st.one_of(
    # XLA on CPU flushes subnormals to 0 (also ones made by / temperature): keep clear of them
    st.floats(-8, 8, width=32).map(lambda v: v if abs(v) > 1e-30 else 0.0),
    st.integers(-2, 2).map(float),  # coarse values: many exact ties
)


@settings(max_examples=30, deadline=None)
@given(
    logits=st.lists(st.lists(row_values, min_size=10, max_size=10), min_size=2, max_size=2),
    temperature=st.sampled_from([0.0, 0.5, 1.0, 2.0]),  # powers of two: scaling is exact in float32
    top_k=st.sampled_from([0, 1, 3, 10]),
    top_p=st.one_of(st.just(1.0), st.floats(1e-3, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_sampling_emits_only_allowed_tokens(logits, temperature, top_k, top_p, min_p, seed):
  """The kept set lies between a float64 reference with slightly tighter and slightly looser
  top_p / min_p thresholds, and 200 draws never leave it."""
  logits = np.asarray(logits, np.float32)  # [batch, vocab]
  keys = jax.random.split(jax.random.key(seed), 200)
  samples = np.asarray(_sample_many(keys, logits, temperature, top_k, top_p, min_p))  # [200, batch]
  if temperature == 0:  # greedy: exactly argmax whatever the filters
    assert (samples == logits.argmax(-1)).all()
    return
  mask = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits) / temperature, top_k, top_p, min_p)))
  for row in range(logits.shape[0]):
    args = (logits[row], temperature, top_k, top_p, min_p)
    strict, loose = allowed_np(*args, slack=-1e-4), allowed_np(*args, slack=1e-4)
    assert mask[row].any(), "every filter keeps at least the top token"
    assert (strict <= mask[row]).all() and (mask[row] <= loose).all()
    assert loose[samples[:, row]].all()
    if top_k == 1 and np.sum(logits[row] == logits[row].max()) == 1:
      assert (samples[:, row] == logits[row].argmax()).all()


def test_top_p_keeps_top_token_and_ties():
  logits = jnp.array([[0.0, 3.0, 1.0, 3.0], [5.0, 1.0, 2.0, -jnp.inf]])
  kept = np.isfinite(filter_logits(logits, top_p=1e-6))
  np.testing.assert_array_equal(kept, [[False, True, False, True], [True, False, False, False]])


def test_top_k_keeps_ties_with_kth():
  kept = np.isfinite(filter_logits(jnp.array([[1.0, 2.0, 2.0, 0.0]]), top_k=2))
  np.testing.assert_array_equal(kept, [[False, True, True, False]])
  kept = np.isfinite(filter_logits(jnp.array([[3.0, 2.0, 2.0, 0.0]]), top_k=2))
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_sampling_frequencies_follow_tempered_softmax():
  """With filters off, draws follow softmax(logits / temperature): catches a temperature applied
  the wrong way round, which allowed-set checks cannot see."""
  logits = jnp.array([[0.0, 1.0, 2.0]])
  keys = jax.random.split(jax.random.key(0), 20000)
  samples = np.asarray(_sample_many(keys, logits, 2.0, 0, 1.0, 0.0))[:, 0]
  freq = np.bincount(samples, minlength=3) / len(samples)
  np.testing.assert_allclose(freq, _softmax_np(np.array([0.0, 0.5, 1.0])), atol=0.015)


def test_invalid_filter_settings_raise():
  logits = jnp.zeros((1, 4))
  for kw in (dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.5), dict(top_k=-1)):
    with pytest.raises(ValueError):
      filter_logits(logits, **kw)
