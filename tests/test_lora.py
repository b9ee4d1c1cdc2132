"""LoRA (jaxlm/posttrain/lora.py): a new adapter changes nothing, merging changes nothing, only the
adapters train (and have optimizer state), 8 sharded devices train as one, checkpoints hold the
adapters alone and resume exactly from the base their run recorded, and a LoRA run exports merged.

Trainable shares at rank 8 are printed with `python -m pytest tests/test_lora.py -s -k share`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import presets
from jaxlm.config import ConfigError, base_config, lora_targets, validate
from jaxlm.interop import hf
from jaxlm.interop.errors import InteropError
from jaxlm.models import build_model
from jaxlm.models.layers import ADAPTERS, BASE
from jaxlm.parallel.sharding import global_batch
from jaxlm.posttrain import lora
from jaxlm.runs import load_params
from jaxlm.train.loop import train
from jaxlm.train.setup import init_sharded_state, jit_train_step, make_setup
from test_parallel import packed_batch, rel_err, tiny_config


def small(scan=True, targets="all", rank=4, **model):
  c = base_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                 max_seq_len=16, **model)
  c.data.seq_len = 16
  c.compute.scan_layers = scan
  c.lora.update(rank=rank, targets=targets, alpha=8.0)
  return validate(c)


def tokens(n=2, t=12, vocab=64, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (n, t)), jnp.int32)


def with_random_b(model, seed=1):
  """The model with every B drawn normal(0, 0.1) (a trained adapter), as a new model."""
  graphdef, adapters, base = nnx.split(model, ADAPTERS, BASE)
  pure = nnx.to_pure_dict(adapters)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(pure))))

  def draw(path, x):
    last = path[-1].key
    return jax.random.normal(next(keys), x.shape, x.dtype) * 0.1 if last == "b" else x
  nnx.replace_by_pure_dict(adapters, jax.tree_util.tree_map_with_path(draw, pure))
  return nnx.merge(graphdef, adapters, base)


@pytest.mark.fast
@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, r"'lora.rank' must be an integer >= 0"),
    ("alpha", 0.0, r"'lora.alpha' must be > 0"),
    ("dropout", 0.1, r"'lora.dropout' is 0.1, but LoRA dropout is not implemented; set lora.dropout=0"),
    ("targets", "q,proj", r"'lora.targets': 'proj' is not a projection"),
    ("targets", "", r"'lora.targets': '' is not a projection"),
])
def test_bad_lora_fields_are_named(field, value, message):
  c = base_config()
  c.lora.rank = 8
  c.lora[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(c)


@pytest.mark.fast
def test_targets_name_projections_or_groups():
  c = base_config()
  assert lora_targets(c.lora, c.model) == ("q", "k", "v", "o")  # the default
  c.lora.targets = "down, q,attn"
  assert lora_targets(c.lora, c.model) == ("q", "k", "v", "o", "down")
  c.lora.targets = "all"
  assert lora_targets(c.lora, c.model) == ("q", "k", "v", "o", "up", "gate", "down")
  c.model.mlp_kind = "gelu"  # no gate: the groups leave it out, naming it is an error
  assert lora_targets(c.lora, c.model) == ("q", "k", "v", "o", "up", "down")
  c.lora.targets = "q,gate"
  with pytest.raises(ConfigError, match="'gate' but model.mlp_kind is 'gelu'"):
    lora_targets(c.lora, c.model)


@pytest.mark.parametrize("scan", [True, False])
def test_new_adapters_leave_the_base_model_exactly(scan):
  c = small(scan, attention_bias=True, mlp_bias=True)
  with_lora = build_model(c)
  c.lora.rank = 0
  plain = build_model(c)
  # Adapters draw from their own stream: the base weights are the plain model's of the same seed
  for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(nnx.state(with_lora, BASE))):
    np.testing.assert_array_equal(a, b)
  ids = tokens()
  np.testing.assert_array_equal(with_lora(ids), plain(ids))  # B = 0: bit-identical logits
  adapters = nnx.to_flat_state(nnx.state(with_lora, ADAPTERS))
  names = {p[-2] for p, _ in adapters}
  assert names == {"q_lora", "k_lora", "v_lora", "o_lora", "up_lora", "gate_lora", "down_lora"}
  axes = {}
  for path, v in adapters:  # (every unscanned layer has the same axes)
    axes.setdefault(path[-2:], v.get_metadata()["out_sharding"])
  lead = ("layers",) if scan else ()
  assert axes[("q_lora", "a")] == (*lead, "embed", "lora")
  assert axes[("q_lora", "b")] == (*lead, "lora", "heads", "head_dim")
  assert axes[("o_lora", "a")] == (*lead, "heads", "head_dim", "lora")
  assert axes[("down_lora", "b")] == (*lead, "lora", "embed")


@pytest.mark.parametrize("scan", [True, False])
def test_merged_model_computes_what_the_adapted_one_does(scan, tmp_path):
  c = small(scan, targets="q,v,o,down,gate")
  model = with_random_b(build_model(c))
  merged = lora.merge(model)
  assert merged.lora is None and not jax.tree.leaves(nnx.state(merged, ADAPTERS))
  ids = tokens()
  want, got = model(ids), merged(ids)
  assert float(jnp.abs(want - build_model(c)(ids)).max()) > 1e-3  # the adapters do change the logits
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Untargeted weights are untouched; targeted ones moved by scale A B exactly
  base, out = nnx.to_pure_dict(nnx.state(model, BASE)), nnx.to_pure_dict(nnx.state(merged, nnx.Param))
  block = (lambda d: d["blocks"]) if scan else (lambda d: d["blocks"][0])
  np.testing.assert_array_equal(block(out)["attn"]["k"], block(base)["attn"]["k"])
  ad = block(nnx.to_pure_dict(nnx.state(model, ADAPTERS)))["attn"]["q_lora"]
  a, b = (ad["a"][0], ad["b"][0]) if scan else (ad["a"], ad["b"])
  q_base, q_out = (block(base)["attn"]["q"][0], block(out)["attn"]["q"][0]) if scan else \
      (block(base)["attn"]["q"], block(out)["attn"]["q"])
  np.testing.assert_allclose(q_out, q_base + 2.0 * np.einsum("dr,rhk->dhk", a, b), atol=1e-6)  # alpha 8 / rank 4
  if scan:
    return
  # Export: the adapted model is refused by name, its merge writes like any model
  with pytest.raises(InteropError, match="LoRA adapters.*lora.merge"):
    hf.save_model(model, str(tmp_path / "refused"))
  hf.save_model(merged, str(tmp_path / "hf"))
  loaded, _ = hf.load_model(str(tmp_path / "hf"))
  np.testing.assert_allclose(loaded(ids), want, atol=1e-5, rtol=1e-5)


def _share(config, targets):
  config.lora.update(rank=8, targets=targets)
  validate(config)
  adapters, total = lora.parameter_counts(nnx.eval_shape(lambda: build_model(config)))
  return adapters, total - adapters, adapters / total


@pytest.mark.fast
def test_trainable_share_at_rank_8():
  """d_model 256, 4 layers (the base config and the shakespeare preset): the default targets
  (q,k,v,o) train 1.47% of the parameters; every projection 3.7%. Printed with -s."""
  for name in ("shakespeare", "tiny"):
    for targets in ("q,k,v,o", "all"):
      c = presets.load(name).get_config()
      if not c.model.vocab_size:
        c.model.vocab_size = c.tokenizer.vocab_size
      n, frozen, share = _share(c, targets)
      print(f"\n{name} (d_model {c.model.d_model}, {c.model.num_layers} layers), rank 8 on {targets}: "
            f"{n:,} trainable of {n + frozen:,} = {100 * share:.2f}%")
      if name == "shakespeare" and targets == "q,k,v,o":  # (the README's figures)
        assert c.model.d_model == 256 and c.model.num_layers == 4
        assert (n, n + frozen) == (65_536, 4_524_288) and share <= 0.02


def train_steps(c, devices, steps=3):
  setup = make_setup(c, devices)
  state = init_sharded_state(setup)
  frozen = lora.frozen_base(setup)
  step = jit_train_step(setup, frozen_shardings=setup.frozen_shardings)
  batch = global_batch(packed_batch(c), setup.batch_sharding)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, frozen)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state, frozen, setup


@pytest.fixture(scope="module")
def one_device_runs():
  """scan_layers -> the one-device run of that layer layout, computed once for the module."""
  return {}


@pytest.mark.parametrize("scan, mesh", [
    (True, dict(data=1, fsdp=4, tensor=2)),
    (False, dict(data=1, fsdp=4, tensor=2)),
    (True, dict(data=1, stage=2, fsdp=2, tensor=2)),  # pipelined: stages take their layers' adapters
], ids=["fsdp4_tp2_scan", "fsdp4_tp2_unrolled", "pp2_fsdp2_tp2"])
def test_lora_on_8_devices_trains_as_on_one_and_only_adapters_train(scan, mesh, one_device_runs,
                                                                    module_compile_cache):
  def config(**mesh):
    c = tiny_config(**mesh)
    c.compute.scan_layers = scan
    c.lora.update(rank=4, targets="all")
    return validate(c)
  if scan not in one_device_runs:  # the scanned layouts share their one-device run
    one_device_runs[scan] = train_steps(config(), jax.devices()[:1])
  one_losses, one, base, _ = one_device_runs[scan]
  losses, state, frozen, setup = train_steps(config(**mesh), jax.devices())
  assert losses[-1] < losses[0]
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
  errors = {jax.tree_util.keystr(p): rel_err(jax.device_get(a), jax.device_get(b)) for (p, a), b in
            zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(one.params))}
  print(f"\n{mesh} vs 1 device, scan_layers={scan}: loss rel error "
        f"{np.abs(losses / one_losses - 1).max():.1e}, worst adapter {max(errors.values()):.1e}")
  # The b factors start at zero, so after 3 steps they are Adam's normalized first updates of small
  # gradients, which amplify the sharded runs' other summation order: 1.1e-5 measured on the MLP's
  # b's, 1e-7 on the a's.
  assert max(errors.values()) <= 2e-5, errors
  # The adapters moved; the base is what it was, and sharded by the rules like any weight
  assert all(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(nnx.state(state.params)))
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b))
  embed = nnx.to_pure_dict(frozen)["embed"]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # [vocab, embed]
  a = nnx.to_pure_dict(state.params)["blocks"]
  a = (a if scan else a[0])["attn"]["q_lora"]["a"]  # [layers, embed, lora]: layers on stage, embed on fsdp
  layers = ("stage" if mesh.get("stage", 1) > 1 else None,) if scan else ()  # size-1 axes drop out
  assert tuple(a.sharding.spec) == (*layers, "fsdp", None)
  # The train state holds adapters only: its params and every array of the optimizer state
  arrays = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(
      (state.params, state.opt_state)) if x.ndim]
  assert arrays and all("_lora']" in p for p, _ in arrays), [p for p, _ in arrays]
  n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for _, x in arrays) == 3 * n_adapters  # the adapters, Adam's mu and nu


# The loop: adapter-only checkpoints, resume from the recorded base, export merged.

def loop_config(workdir, base):
  c = presets.load("tiny").get_config()
  c.train.update(steps=4, warmup_steps=1, log_every=1, workdir=str(workdir), progress_bar=False,
                 eval_batches=1)
  c.tokenizer.cache_dir = str(workdir.parent / "tokenizers")
  c.lora.update(rank=4, targets="all")
  c.checkpoint.init_from = str(base)
  return c


def logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A plain tiny run: the base the LoRA runs train on."""
  root = tmp_path_factory.mktemp("lora")
  c = presets.load("tiny").get_config()
  c.train.update(steps=2, warmup_steps=1, eval_batches=1, workdir=str(root / "base"), progress_bar=False)
  c.tokenizer.cache_dir = str(root / "tokenizers")
  train(c)
  return root / "base"


def test_adapter_checkpoints_resume_exactly_from_the_recorded_base(base_run, capsys, module_compile_cache):
  root = base_run.parent
  straight = train(loop_config(root / "straight", base_run))
  assert "trainable (LoRA rank 4 on all:" in capsys.readouterr().out
  train(loop_config(root / "resumed", base_run), stop_at_step=2)
  # The resume names no base: it is read from the run's config.json
  c = loop_config(root / "resumed", base_run)
  c.checkpoint.init_from = ""
  resumed = train(c)
  a, b = logged_losses(root / "straight"), logged_losses(root / "resumed")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical
  for x, y in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert np.isfinite(resumed["metrics"]["eval_bits_per_byte"])

  with open(root / "resumed" / "config.json") as f:
    assert json.load(f)["checkpoint"]["init_from"] == os.path.abspath(base_run)
  # The checkpoint's parameters are the adapters alone
  saved = {".".join(map(str, p)) for p, _ in
           nnx.to_flat_state(nnx.state(resumed["state"].params))}
  assert saved and all("_lora." in p for p in saved)
  meta = json.dumps(json.load(open(root / "resumed" / "checkpoints" / "4" / "state" / "_METADATA")))
  assert "q_lora" in meta and "'embed'" not in meta and '"embed"' not in meta

  # Another base for a run that has one is refused by name
  c = loop_config(root / "resumed", root / "straight")
  with pytest.raises(ConfigError, match="trains adapters on .*base"):
    train(c)

  # load_params merges: a plain model computing what the adapted one does; --to_hf exports it
  from jaxlm.interop.run_dirs import to_hf
  run = load_params(str(root / "resumed"))
  assert not jax.tree.leaves(nnx.state(run.model(), ADAPTERS))
  adapted = nnx.merge(resumed["graphdef"], resumed["state"].params, resumed["frozen"])
  ids = tokens(vocab=512)
  np.testing.assert_allclose(run.model()(ids), adapted(ids), atol=1e-5, rtol=1e-5)
  to_hf(str(root / "resumed"), str(root / "hf"), None)
  exported, _ = hf.load_model(str(root / "hf"))
  np.testing.assert_allclose(exported(ids), adapted(ids), atol=1e-5, rtol=1e-5)


def test_aot_plan_of_a_lora_job_holds_the_base_once():
  """On 4 abstract v5p chips (fsdp 4): a LoRA step's arguments are the base's shards plus small
  adapters, far under the parameters and two Adam moments a full fine-tune holds."""
  pytest.importorskip("libtpu", reason="the planner needs libtpu (pip install -e '.[test]' installs it)")
  from jaxlm.aot.plan import plan, tpu_devices
  c = presets.load("tiny").get_config()
  c.model.update(d_model=512, mlp_dim=2048)  # TPU tiles pad dims to 128: shards of 64/4 would not shrink
  c.mesh.update(data=1, fsdp=4)
  c.lora.rank = 8
  p = plan(validate(c), tpu_devices("v5p:2x2x1"))
  n_adapters, n_all = lora.parameter_counts(nnx.eval_shape(lambda: build_model(c)))
  base_bytes_per_chip = 4 * (n_all - n_adapters) / 4  # float32, split over fsdp 4
  print(f"\nLoRA plan arguments {p.arguments:,} bytes per chip; base shards {base_bytes_per_chip:,.0f}")
  assert p.fits and base_bytes_per_chip < p.arguments < 1.5 * base_bytes_per_chip
