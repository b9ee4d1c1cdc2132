"""Generation speed: jaxlm's batched decoding vs transformers' `generate`, and speculative decoding.

Part 1 (throughput): one random Llama (transformers `LlamaForCausalLM`, float32, saved with
safetensors and loaded into jaxlm with `jaxlm.interop.hf.load_model`, so both run the same weights)
decodes greedily in both stacks at batch 1 and batch 32: time to first token (a prompt of --prompt
tokens, one new token) and decode tokens/s ((new - 1) x batch / (time for --new tokens - time to
first token)); median of --reps after a warm-up (jaxlm's compile is not timed), the whole set
repeated --rounds times interleaved, ratios taken within a round. Each stack runs
twice: in float32, and with bfloat16 matmul operands (jaxlm: `jaxlm.inference.precision.
with_matmul_dtype`, float32 accumulation, activations and KV cache float32; transformers:
`torch.autocast("cpu", bfloat16)`, which also runs its matmuls on bf16 operands and keeps the
rest float32). Ratios compare like with like: float32 with float32, bf16 with bf16.

Part 2 (speculative): a target of --target_layers layers and a draft of about a quarter of them
(--draft_layers), both the Shakespeare preset otherwise, trained here on the embedded corpus for
--train_steps (or given with --target_workdir/--draft_workdir); prompts are 16-token passages of the
held-out plays. Greedy plain decoding vs speculative decoding with k = --k, at batch 1 and 8:
acceptance rate and wall-time ratio (the outputs are asserted equal). Both models decode with
--spec_matmul_dtype operands (float32 by default, whatever they trained with).

  pip install -e ".[bench]"       # torch==2.13.0 + transformers
  python benchmarks/generate.py                     # both parts; part 2 trains two small models first
  python benchmarks/generate.py --part throughput
  python benchmarks/generate.py --part speculative --target_workdir runs/t --draft_workdir runs/d
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--part", default="all", choices=("all", "throughput", "speculative"))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1,
                 help="part 1: measure every stack this many times, interleaved (jaxlm, transformers, "
                      "jaxlm, ...), and report the median of the per-round ratios with their range: "
                      "on a shared host one stack's rate can move 2x between minutes")
  p.add_argument("--prompt", type=int, default=64, help="prompt tokens (part 1)")
  p.add_argument("--new", type=int, default=64, help="new tokens per row")
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--k", type=int, default=4, help="draft tokens a round (part 2)")
  p.add_argument("--target_layers", type=int, default=8)
  p.add_argument("--draft_layers", type=int, default=2)
  p.add_argument("--train_steps", type=int, default=600)
  p.add_argument("--target_workdir", default="")
  p.add_argument("--draft_workdir", default="")
  p.add_argument("--workdir", default="", help="where part 2 trains its runs (default: a temp dir)")
  p.add_argument("--spec_matmul_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="matmul operands both models decode with in part 2 (XLA:CPU upcasts "
                      "batch-1 bfloat16 matrix-vector products to float32, converting the weights)")
  return p.parse_args(argv)


def timed(fn, reps):
  fn()  # warm-up: compiles jaxlm's program, warms torch's allocator
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def throughput(a):
  import jax
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from jaxlm.inference.decode import generate_batch
  from jaxlm.inference.layout import for_decoding
  from jaxlm.inference.precision import with_matmul_dtype
  from jaxlm.interop import hf

  cfg = transformers.LlamaConfig(
      vocab_size=a.vocab, hidden_size=a.d_model, intermediate_size=a.mlp, num_hidden_layers=a.layers,
      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
      max_position_embeddings=a.prompt + a.new + 64, tie_word_embeddings=True)
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(cfg).eval()
  hf_model.generation_config.eos_token_id = None
  hf_model.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as d:
    hf_model.save_pretrained(d, safe_serialization=True)
    model, _ = hf.load_model(d)
  graphdef, params = for_decoding(*nnx.split(model))  # what `python -m jaxlm.generate` decodes with
  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"model: {n_params / 1e6:.1f}M parameters (vocab {a.vocab}, d_model {a.d_model}, {a.layers} "
        f"layers), prompt {a.prompt} tokens, {a.new} new tokens, greedy, float32 weights, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average "
        f"{os.getloadavg()[0]:.1f} (other processes share the cores: compare ratios within a run)")
  low = with_matmul_dtype(graphdef, params, "bfloat16")
  rows = []
  for batch in (1, 32):
    ids = np.random.default_rng(0).integers(0, a.vocab, (batch, a.prompt)).astype(np.int32)

    def jax_run(n, model=(graphdef, params)):
      out = generate_batch(*model, list(ids), max_new_tokens=n)
      return out.tokens

    def torch_run(n, autocast=False):
      with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return hf_model.generate(torch.as_tensor(ids, dtype=torch.long), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)

    jax_same = np.stack(jax_run(8))
    torch_same = torch_run(8)[:, a.prompt:].numpy()
    agree = float((jax_same == torch_same).mean())
    low_agree = float((np.stack(jax_run(8, low)) == jax_same).mean())
    stacks = (("jaxlm", "float32", jax_run), ("transformers", "float32", torch_run),
              ("jaxlm", "bf16 matmul", lambda n: jax_run(n, low)),
              ("transformers", "bf16 autocast", lambda n: torch_run(n, True)))
    for r in range(a.rounds):
      for name, dtype, run in stacks:
        first = timed(lambda: run(1), a.reps)
        full = timed(lambda: run(a.new), a.reps)
        rows.append((batch, r, name, dtype, first, (a.new - 1) * batch / (full - first)))
    print(f"batch {batch}: greedy tokens identical in the first 8 steps: {agree:.0%} (float32 vs "
          f"transformers), {low_agree:.0%} (bf16 matmul vs float32)")
  print(f"\n{'batch':>5} {'round':>5} {'stack':>13} {'dtype':>14} {'first token ms':>15} "
        f"{'decode tok/s':>13}")
  for batch, r, name, dtype, first, rate in rows:
    print(f"{batch:>5} {r:>5} {name:>13} {dtype:>14} {first * 1e3:>15.1f} {rate:>13.0f}")
  for batch in (1, 32):
    for pair in ((0, 1), (2, 3)):  # float32 with float32, bf16 with bf16
      mine = [[x for x in rows if x[0] == batch and x[1] == r] for r in range(a.rounds)]
      ratios = [m[pair[0]][5] / m[pair[1]][5] for m in mine]
      ttft = [m[pair[1]][4] / m[pair[0]][4] for m in mine]
      spread = f" (rounds: {min(ratios):.2f}x to {max(ratios):.2f}x)" if a.rounds > 1 else ""
      print(f"batch {batch}, {mine[0][pair[0]][3]} vs {mine[0][pair[1]][3]}: jaxlm / transformers "
            f"decode tokens/s = {statistics.median(ratios):.2f}x{spread}; time to first token "
            f"{statistics.median(ttft):.2f}x faster")


def train(workdir, layers, steps):
  cmd = [sys.executable, "-m", "jaxlm.train", "--config=configs/shakespeare.py",
         f"--config.model.num_layers={layers}", f"--config.train.steps={steps}",
         f"--config.train.workdir={workdir}", "--config.train.progress_bar=False",
         "--config.checkpoint.async_save=False", "--config.sample.max_new_tokens=0",
         f"--config.train.warmup_steps={min(50, steps // 4)}"]
  print("training:", " ".join(cmd[2:]), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def speculative(a):
  import jax
  import numpy as np

  from jaxlm import runs
  from jaxlm.data import sources
  from jaxlm.inference.decode import generate_batch
  from jaxlm.inference.layout import for_decoding
  from jaxlm.inference.precision import with_matmul_dtype
  from jaxlm.inference.speculative import speculative_batch

  base = a.workdir or tempfile.mkdtemp(prefix="jaxlm-spec-")
  target_dir = a.target_workdir or os.path.join(base, "target")
  draft_dir = a.draft_workdir or os.path.join(base, "draft")
  if not a.target_workdir:
    train(target_dir, a.target_layers, a.train_steps)
  if not a.draft_workdir:
    train(draft_dir, a.draft_layers, a.train_steps)
  target, draft = runs.load_params(target_dir), runs.load_params(draft_dir)
  tok = target.tokenizer
  t_model = with_matmul_dtype(*for_decoding(target.graphdef, target.params), a.spec_matmul_dtype)
  d_model = with_matmul_dtype(*for_decoding(draft.graphdef, draft.params), a.spec_matmul_dtype)
  text = " ".join(sources.documents(target.config.data, "eval"))
  ids = tok.encode(text[:200_000])
  rng = np.random.default_rng(0)
  print(f"target {target.config.model.num_layers} layers, draft {draft.config.model.num_layers} "
        f"layers, k={a.k}, {a.new} new tokens, greedy, {a.spec_matmul_dtype} matmuls, load average "
        f"{os.getloadavg()[0]:.1f}")
  # draft/target: the draft's plain greedy decoding time over the target's, i.e. what a draft call
  # costs in target calls; a round costs about 1 + k x that, and emits 1 to k + 1 tokens
  print(f"\n{'batch':>5} {'plain ms':>9} {'speculative ms':>15} {'speed-up':>9} {'acceptance':>11} "
        f"{'rounds':>7} {'draft/target':>13}")
  for batch in (1, 8):
    starts = rng.integers(0, len(ids) - 16, batch)
    prompts = [[tok.bos_id] + ids[s:s + 16] for s in starts]
    plain = lambda: generate_batch(*t_model, prompts, max_new_tokens=a.new)
    spec = lambda: speculative_batch(t_model, d_model, prompts, k=a.k, max_new_tokens=a.new)
    draft_plain = lambda: generate_batch(*d_model, prompts, max_new_tokens=a.new)
    want, (got, stats) = plain(), spec()
    assert all((x == y).all() for x, y in zip(want.tokens, got.tokens)), "speculative != plain"
    t_plain, t_spec, t_draft = timed(plain, a.reps), timed(spec, a.reps), timed(draft_plain, a.reps)
    print(f"{batch:>5} {t_plain * 1e3:>9.0f} {t_spec * 1e3:>15.0f} {t_plain / t_spec:>8.2f}x "
          f"{stats.acceptance:>11.2f} {stats.rounds:>7} {t_draft / t_plain:>13.2f}")


def main(a):
  if a.part in ("all", "throughput"):
    throughput(a)
  if a.part in ("all", "speculative"):
    speculative(a)


if __name__ == "__main__":
  main(parse_args())
