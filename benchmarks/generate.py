"""Generation speed: jaxlm's batched decoding vs transformers' `generate`, and speculative decoding.

Part 1 (throughput): one random Llama (transformers `LlamaForCausalLM`, float32, saved with
safetensors and loaded into jaxlm with `jaxlm.interop.hf.load_model`, so both run the same weights)
decodes greedily in both stacks at batch 1 and batch 32: time to first token (a prompt of --prompt
tokens, one new token) and decode tokens/s ((new - 1) x batch / (time for --new tokens - time to
first token)); median of --reps after a warm-up (jaxlm's compile is not timed).

Part 2 (speculative): a target of --target_layers layers and a draft of about a quarter of them
(--draft_layers), both the Shakespeare preset otherwise, trained here on the embedded corpus for
--train_steps (or given with --target_workdir/--draft_workdir); prompts are 16-token passages of the
held-out plays. Greedy plain decoding vs speculative decoding with k = --k, at batch 1 and 8:
acceptance rate and wall-time ratio (the outputs are asserted equal).

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
  graphdef, params = nnx.split(model)
  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"model: {n_params / 1e6:.1f}M parameters (vocab {a.vocab}, d_model {a.d_model}, {a.layers} "
        f"layers), prompt {a.prompt} tokens, {a.new} new tokens, greedy, float32, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
  rows = []
  for batch in (1, 32):
    ids = np.random.default_rng(0).integers(0, a.vocab, (batch, a.prompt)).astype(np.int32)

    def jax_run(n):
      out = generate_batch(graphdef, params, list(ids), max_new_tokens=n)
      return out.tokens

    def torch_run(n):
      with torch.no_grad():
        return hf_model.generate(torch.as_tensor(ids, dtype=torch.long), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False)

    jax_same = np.stack(jax_run(8))
    torch_same = torch_run(8)[:, a.prompt:].numpy()
    agree = float((jax_same == torch_same).mean())
    for name, run in (("jaxlm", jax_run), ("transformers", torch_run)):
      first = timed(lambda: run(1), a.reps)
      full = timed(lambda: run(a.new), a.reps)
      rows.append((batch, name, first, (a.new - 1) * batch / (full - first)))
    print(f"batch {batch}: greedy tokens identical in the first 8 steps: {agree:.0%}")
  print(f"\n{'batch':>5} {'stack':>13} {'first token ms':>15} {'decode tok/s':>13}")
  for batch, name, first, rate in rows:
    print(f"{batch:>5} {name:>13} {first * 1e3:>15.1f} {rate:>13.0f}")
  for batch in (1, 32):
    j, t = [r for r in rows if r[0] == batch]
    print(f"batch {batch}: jaxlm / transformers decode tokens/s = {j[3] / t[3]:.2f}x; "
          f"time to first token {t[2] / j[2]:.2f}x faster")


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
  text = " ".join(sources.documents(target.config.data, "eval"))
  ids = tok.encode(text[:200_000])
  rng = np.random.default_rng(0)
  print(f"target {target.config.model.num_layers} layers, draft {draft.config.model.num_layers} "
        f"layers, k={a.k}, {a.new} new tokens, greedy")
  print(f"\n{'batch':>5} {'plain ms':>9} {'speculative ms':>15} {'speed-up':>9} {'acceptance':>11}")
  for batch in (1, 8):
    starts = rng.integers(0, len(ids) - 16, batch)
    prompts = [[tok.bos_id] + ids[s:s + 16] for s in starts]
    plain = lambda: generate_batch(target.graphdef, target.params, prompts, max_new_tokens=a.new)
    spec = lambda: speculative_batch((target.graphdef, target.params),
                                     (draft.graphdef, draft.params), prompts, k=a.k,
                                     max_new_tokens=a.new)
    want, (got, stats) = plain(), spec()
    assert all((x == y).all() for x, y in zip(want.tokens, got.tokens)), "speculative != plain"
    t_plain, t_spec = timed(plain, a.reps), timed(spec, a.reps)
    print(f"{batch:>5} {t_plain * 1e3:>9.0f} {t_spec * 1e3:>15.0f} {t_plain / t_spec:>8.2f}x "
          f"{stats.acceptance:>11.2f}")


def main(a):
  if a.part in ("all", "throughput"):
    throughput(a)
  if a.part in ("all", "speculative"):
    speculative(a)


if __name__ == "__main__":
  main(parse_args())
