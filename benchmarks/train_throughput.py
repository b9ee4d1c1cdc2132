"""CPU training throughput: jaxlm's real train step vs Hugging Face transformers LlamaForCausalLM (PyTorch).

Both stacks build the same Llama-style model (SwiGLU, RMSNorm, RoPE, MHA/GQA, tied embeddings unless
--untie) with the same vocab/width/layers/heads/MLP/sequence/batch, train on the same random token batch
with AdamW (lr 3e-3 constant, b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices only,
global-norm clip 1.0), parameters and optimizer state in float32, and are timed forward + backward +
optimizer step. Steps are interleaved (one step of every row per round) so background load hits all
rows alike; the median step is reported, with the process CPU time per step (robust to load).

jaxlm rows use jaxlm's own make_train_step (jitted, state donated) on jaxlm's Transformer. Extra jaxlm
rows: --jaxlm_variant "name:compute.scan_layers=False,compute.compute_dtype=bfloat16,xla_cpu_...=..." (config
fields are set on jaxlm's base config; keys starting with xla_ are passed to XLA as compiler options
for that row only). The transformers baseline is eager PyTorch, float32, attn_implementation --attn
("sdpa" by default; "eager" is the unfused reference); an autocast-bf16 row is on by default
(--no_torch_bf16 drops it), --compile adds torch.compile. Two jaxlm rows are always timed: float32
defaults, and the CPU preset's model settings (bf16 matmul operands, float32 accumulation,
activations and master weights: configs/shakespeare.py), whose like-for-like peer is autocast-bf16.

  python benchmarks/train_throughput.py               # jaxlm vs transformers eager, about a minute idle
  python benchmarks/train_throughput.py --compile
  python benchmarks/train_throughput.py --jaxlm_variant "noscan:compute.scan_layers=False"

FLOPs: "6N" is 6 x all parameters x tokens (tied embeddings counted once); "jaxlm" is
jaxlm.train.flops.train_flops_per_token (every matmul incl. logits, causal attention QK^T/PV at half).
"of XLA roof" divides the jaxlm-convention rate by XLA's float32 2048^3 matmul rate measured in this
run (best of a measurement before and after the timed steps). Needs `pip install -e ".[bench]"` (torch==2.13.0 + transformers).
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=8, help="timed steps per row (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per row after compilation")
  p.add_argument("--block", type=int, default=2,
                 help="consecutive steps of a row per round; the first of each block is untimed, so one "
                 "stack's after-effects (spinning OpenMP/XLA worker threads, cold caches) do not land on "
                 "another's timed step. 1: strict step-by-step alternation, every step timed")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=0, help="0: same as --heads (MHA)")
  p.add_argument("--mlp", type=int, default=768)
  p.add_argument("--untie", action="store_true", help="separate output projection in both stacks")
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attn_implementation")
  p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (a second baseline)")
  p.add_argument("--no_torch_bf16", dest="torch_bf16", action="store_false",
                 help="skip the transformers eager row under torch.autocast('cpu', bfloat16)")
  p.add_argument("--no_torch", action="store_true", help="time jaxlm only")
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before jax is imported (all jaxlm rows)")
  p.add_argument("--jax_bf16", action="store_true", help="also time jaxlm with compute.compute_dtype=bfloat16")
  p.add_argument("--jaxlm_variant", action="append", default=[], metavar="NAME:KEY=VAL,...",
                 help="an extra jaxlm row: config fields (section.field=value) and xla_* compiler options")
  return p.parse_args(argv)


ARGS = parse_args()
if ARGS.xla_flags:  # must happen before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm.config import base_config, validate  # noqa: E402
from jaxlm.models import Transformer  # noqa: E402
from jaxlm.models.compute import resolve  # noqa: E402
from jaxlm.train import flops  # noqa: E402
from jaxlm.train.optimizer import make_optimizer  # noqa: E402
from jaxlm.train.step import init_state, make_train_step  # noqa: E402


def median(xs):
  return float(np.median(np.asarray(xs)))


# ----------------------------------------------------------------------------- the matmul roof
def xla_matmul_gflops(n=2048, repeats=5, dtype=jnp.float32):
  """XLA n^3 matmul rate (GFLOP/s) on `dtype` operands with float32 accumulation, median of `repeats`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / median(ts) / 1e9


def torch_matmul_gflops(n=2048, repeats=5):
  import torch
  a = torch.randn(n, n)
  a @ a
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    a @ a
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / median(ts) / 1e9


# ----------------------------------------------------------------------------- jaxlm
def _parse_value(old, text):
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("true", "1")
  return type(old)(text)


def parse_variant(spec: str):
  """'name:section.field=value,xla_flag=value' -> (name, {field: value}, {xla option: value})."""
  name, _, body = spec.partition(":")
  fields, options = {}, {}
  for item in filter(None, (s.strip() for s in body.split(","))):
    key, _, value = item.partition("=")
    if key.startswith("xla_"):
      options[key] = value.lower() == "true" if value.lower() in ("true", "false") else (
          int(value) if value.lstrip("-").isdigit() else value)
    else:
      fields[key] = value
  return name or spec, fields, options


def jaxlm_config(a, fields=None):
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_heads = a.vocab, a.d_model, a.layers, a.heads
  m.num_kv_heads, m.mlp_dim, m.max_seq_len = a.kv_heads or a.heads, a.mlp, a.seq
  m.mlp_kind, m.norm_kind, m.position_kind, m.norm_eps, m.rope_theta = "swiglu", "rmsnorm", "rope", 1e-5, 1e4
  m.tie_embeddings = not a.untie
  c.compute.param_dtype = "float32"
  c.tokenizer.vocab_size = a.vocab
  c.data.seq_len = a.seq
  t = c.train
  t.batch_size, t.grad_accum_steps = a.batch, 1
  t.b1, t.b2, t.eps, t.weight_decay, t.clip_norm, t.z_loss = 0.9, 0.95, 1e-8, 0.1, 1.0, 0.0
  t.learning_rate, t.schedule, t.warmup_steps, t.steps = 3e-3, "constant", 0, 1000
  for key, text in (fields or {}).items():
    section, _, field = key.partition(".")
    if section not in c or field not in c[section]:
      raise SystemExit(f"--jaxlm_variant: unknown config field {key!r}")
    c[section][field] = _parse_value(c[section][field], text)
  return validate(c)


class JaxlmRunner:
  def __init__(self, a, tokens, targets, fields=None, options=None):
    c = jaxlm_config(a, fields)
    model = Transformer(c.model, nnx.Rngs(0), resolve(c.compute, jax.default_backend()))
    graphdef, params = nnx.split(model, nnx.Param)
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = make_optimizer(c.train)
    self.state = init_state(params, tx, 0)
    b, l = tokens.shape
    self.batch = jax.device_put({
        "inputs": tokens.astype(np.int32), "targets": targets.astype(np.int32),
        "segment_ids": np.ones((b, l), np.int32), "weights": np.ones((b, l), np.int32),
        "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()})
    t = time.perf_counter()
    self.step_fn = jax.jit(make_train_step(graphdef, tx, c.train), donate_argnums=0).lower(
        self.state, self.batch).compile(compiler_options=options or None)
    self.compile_s = time.perf_counter() - t
    self.flops_per_token = flops.train_flops_per_token(c.model, l)

  def step(self):
    self.state, metrics = self.step_fn(self.state, self.batch)
    return float(jax.block_until_ready(metrics["loss"]))


# ----------------------------------------------------------------------------- transformers
class TorchRunner:
  def __init__(self, a, tokens, targets, compiled=False, autocast=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.mlp, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads, hidden_act="silu",
        max_position_embeddings=a.seq, rms_norm_eps=1e-5, rope_theta=1e4, initializer_range=0.02,
        tie_word_embeddings=not a.untie, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        use_cache=False, attn_implementation=a.attn)
    self.model = LlamaForCausalLM(cfg).to(torch.float32).train()
    self.n_params = sum(p.numel() for p in self.model.parameters())  # tied weights counted once
    named = list(self.model.named_parameters())
    decays = [p for n, p in named if p.ndim >= 2 and "embed" not in n]  # as jaxlm: matrices, not embeddings
    others = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    self.params = [p for _, p in named]
    self.opt = torch.optim.AdamW([{"params": decays, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                 lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    self.x = torch.from_numpy(tokens.astype(np.int64))
    self.y = torch.from_numpy(targets.astype(np.int64)).reshape(-1)
    self.forward = torch.compile(self.model) if compiled else self.model
    self.torch, self.autocast = torch, autocast
    t = time.perf_counter()
    self.first_loss = self.step()  # compiles for torch.compile; warms the allocator for eager
    self.compile_s = time.perf_counter() - t

  def step(self):
    torch = self.torch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      logits = self.forward(input_ids=self.x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
    self.opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- main
def main(a):
  t_start = time.perf_counter()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, a.vocab, (a.batch, a.seq))
  targets = rng.integers(0, a.vocab, (a.batch, a.seq))
  ntok = a.batch * a.seq

  runners = {"jaxlm (float32, defaults)": JaxlmRunner(a, tokens, targets)}
  # The CPU preset's model settings (configs/shakespeare.py): bf16 matmul operands with float32
  # accumulation, float32 activations and master weights; the fair peer is torch autocast-bf16.
  runners["jaxlm CPU preset (bf16 matmuls)"] = JaxlmRunner(a, tokens, targets, {
      "compute.matmul_dtype": "bfloat16", "compute.scan_layers": "False", "compute.attention_blocks": "4"})
  if a.jax_bf16:
    runners["jaxlm compute_dtype=bfloat16"] = JaxlmRunner(a, tokens, targets, {"compute.compute_dtype": "bfloat16"})
  for spec in a.jaxlm_variant:
    name, fields, options = parse_variant(spec)
    runners[f"jaxlm {name}"] = JaxlmRunner(a, tokens, targets, fields, options)
  ref = None
  if not a.no_torch:
    import torch
    import transformers
    if a.threads:
      torch.set_num_threads(a.threads)
    ref = f"transformers eager fp32 ({a.attn})"
    runners[ref] = TorchRunner(a, tokens, targets)
    if a.torch_bf16:
      runners[f"transformers eager autocast-bf16 ({a.attn})"] = TorchRunner(a, tokens, targets, autocast=True)
    if a.compile:
      runners[f"transformers torch.compile fp32 ({a.attn})"] = TorchRunner(a, tokens, targets, compiled=True)
  jx = runners["jaxlm (float32, defaults)"]

  roof = [xla_matmul_gflops()]
  troof = [] if a.no_torch else [torch_matmul_gflops()]
  losses = {k: [r.first_loss] if hasattr(r, "first_loss") else [] for k, r in runners.items()}
  times = {k: [] for k in runners}
  cpu = {k: [] for k in runners}
  for _ in range(a.warmup):
    for k, r in runners.items():
      losses[k].append(r.step())
  timed_per_block = max(a.block - 1, 1)
  rounds = -(-a.steps // timed_per_block)
  for _ in range(rounds):  # interleaved: a block of steps of every row per round
    for k, r in runners.items():
      if a.block > 1:
        losses[k].append(r.step())
      for _ in range(timed_per_block):
        t, c = time.perf_counter(), time.process_time()
        losses[k].append(r.step())
        times[k].append(time.perf_counter() - t)
        cpu[k].append(time.process_time() - c)
  roof.append(xla_matmul_gflops())
  bf16_roof = xla_matmul_gflops(dtype=jnp.bfloat16)
  if not a.no_torch:
    troof.append(torch_matmul_gflops())
  xla_roof = max(roof)

  n_params = {k: r.n_params for k, r in runners.items()}
  fpt = jx.flops_per_token
  print()
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})"
        + ("" if a.no_torch else f"; torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"transformers {transformers.__version__}"))
  print(f"shape: batch {a.batch} x seq {a.seq} = {ntok} tokens/step; vocab {a.vocab}, d_model {a.d_model}, "
        f"layers {a.layers}, heads {a.heads}, kv_heads {a.kv_heads or a.heads}, mlp {a.mlp} (SwiGLU), "
        f"tied embeddings {not a.untie}; float32 params + AdamW, clip 1.0")
  distinct = sorted(set(n_params.values()))
  print(f"parameters: jaxlm {jx.n_params:,}"
        + ("" if a.no_torch else f", transformers {runners[ref].n_params:,}")
        + ("  (agree)" if len(distinct) == 1 else f"  (DIFFER: {distinct})"))
  print(f"FLOPs/token: 6N = {6 * jx.n_params / 1e6:.2f} M; jaxlm train_flops_per_token = {fpt / 1e6:.2f} M")
  print(f"XLA float32 2048^3 matmul (GFLOP/s, before/after): {roof[0]:.0f}/{roof[1]:.0f}"
        + ("" if a.no_torch else f"; torch float32: {troof[0]:.0f}/{troof[1]:.0f}")
        + f"; roof used: {xla_roof:.0f} (bf16 operands: {bf16_roof:.0f}, the roof of bf16-matmul rows)")
  print(f"median of {len(times[next(iter(times))])} timed steps per row, interleaved in blocks of {a.block} "
        f"(first of each block untimed), after {a.warmup} warm-up; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
  print()
  hdr = (f"{'stack':44s} {'ms/step':>8s} {'cpu ms':>7s} {'tokens/s':>9s} {'GFLOP/s 6N':>10s} "
         f"{'GFLOP/s jaxlm':>13s} {'of XLA roof':>11s} {'vs HF eager':>11s} {'vs HF bf16':>10s}  "
         f"{'loss first->last':>17s}")
  print(hdr)
  print("-" * len(hdr))
  ref_tps = ntok / median(times[ref]) if ref else None
  bf16_ref = next((k for k in runners if "autocast-bf16" in k), None)
  bf16_tps = ntok / median(times[bf16_ref]) if bf16_ref else None
  for k in runners:
    dt = median(times[k])
    tps = ntok / dt
    g6, gj = tps * 6 * n_params[k] / 1e9, tps * fpt / 1e9
    ratio = f"{tps / ref_tps:.2f}x" if ref_tps else "-"
    ratio_bf16 = f"{tps / bf16_tps:.2f}x" if bf16_tps else "-"
    row_roof = bf16_roof if ("bf16" in k or "bfloat16" in k) and k.startswith("jaxlm") else xla_roof
    print(f"{k:44s} {dt * 1e3:8.0f} {median(cpu[k]) * 1e3:7.0f} {tps:9.0f} {g6:10.1f} {gj:13.1f} "
          f"{gj / row_roof:11.0%} {ratio:>11s} {ratio_bf16:>10s}  {losses[k][0]:7.3f}->{losses[k][-1]:.3f}")
  load = os.getloadavg()[0]
  if load > (os.cpu_count() or 1) + 1:
    print(f"\nWARNING: load average {load:.1f} on {os.cpu_count()} cores: other processes competed for the CPU. "
          "Oversubscription slows PyTorch's OpenMP threads far more than XLA's, so the ratios above are "
          "biased towards jaxlm (PyTorch's spinning threads also inflate its 'cpu ms'); re-run on an idle machine.")
  print()
  print("compile / first step (s): " + ", ".join(f"{k}: {r.compile_s:.1f}" for k, r in runners.items())
        + f"; total wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main(ARGS)
