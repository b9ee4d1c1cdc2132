"""The arithmetic task of the post-training demos: k-digit addition, "123+456=" -> "579".

Problems: a + b with a and b drawn uniformly from [0, 10^digits), written without padding
("7+45=52"); the prompt is "a+b=" and the completion the sum followed by a newline ("579\\n").
Everything is deterministic from a seed.

The held-out split is decided by the problem, not by the draw: sha256 of "min(a,b)+max(a,b)"
puts a fixed HELD_OUT_FRACTION of all problems on the held-out side, so a problem is on the same
side for every seed, corpus size and number of digits, and a + b is on the side of b + a (the
model cannot pass a held-out problem by having seen its mirror image). Training text and
post-training data are drawn only from the training side; evaluation only from the held-out one.

Formats:
  - pretraining: JSONL documents {"text": "12+34=46\\n507+8=515\\n..."} of `per_doc` problems, one a
    line, read by jaxlm's jsonl source (data.source=jsonl). Documents, not one long text, so the
    first problem after <s> is common in training: evaluation prompts are [<s>] + "a+b=".
  - post-training: {"prompt": "a+b=", "completion": "579\\n"} (SFT, plain text; see chat.py),
    {"prompt", "chosen", "rejected"} with a near-miss rejected answer (preference pairs),
    {"prompt", "completion", "label"} (KTO), {"prompt", "answer": "579"} (RL, graded by `reward`).

Tokenizer: jaxlm/posttrain/byte_tokenizer.py (one token per byte, so one per digit), written next
to the data by `write_pretrain_data`.

Exact match (`exact_match`): greedy `generate_batch` on held-out problems, each row stopping at a
newline or eos; a problem counts when the text before the newline is exactly the sum.

CLI:
  python -m jaxlm.posttrain.addition --write_data=runs/addition/data [--digits=3]
  python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/pretrain [--n=500]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

from jaxlm.inference import prompts as prompt_text

HELD_OUT_FRACTION = 0.1  # of all problems (pairs {a, b}), fixed by hash
ANSWER_END = "\n"  # ends every completion; generation stops there
MANIFEST = "addition.json"  # what a data directory was written with
_SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Problem:
  a: int
  b: int

  @property
  def answer(self) -> str:
    return str(self.a + self.b)

  @property
  def prompt(self) -> str:
    return f"{self.a}+{self.b}="

  @property
  def completion(self) -> str:
    return self.answer + ANSWER_END

  @property
  def text(self) -> str:
    return self.prompt + self.completion


def split_of(a: int, b: int, held_out_fraction: float = HELD_OUT_FRACTION) -> str:
  """"train" or "eval" for the problem a + b (and b + a): a hash of the pair, never of a seed."""
  lo, hi = min(a, b), max(a, b)
  digest = hashlib.sha256(f"{lo}+{hi}".encode()).digest()
  return "eval" if int.from_bytes(digest[:8], "little") / 2.0 ** 64 < held_out_fraction else "train"


def _rng(seed: int, purpose: str) -> np.random.Generator:
  return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8],
                                              "little"))


def problems(n: int, split: str = "train", seed: int = 0, digits: int = 3, unique: bool | None = None,
             held_out_fraction: float = HELD_OUT_FRACTION) -> list[Problem]:
  """n problems of `split`, deterministic for (seed, split, digits).

  unique (default: True for "eval", False for "train"): no problem twice (a + b and b + a count as
  different problems: they are different strings).
  """
  if split not in _SPLITS:
    raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
  if digits < 1:
    raise ValueError(f"digits must be >= 1, got {digits}")
  unique = split == "eval" if unique is None else unique
  total = 10 ** (2 * digits)
  if unique and n > total * (held_out_fraction if split == "eval" else 1 - held_out_fraction) * 0.9:
    raise ValueError(f"{n} distinct {split} problems of {digits} digits are (nearly) more than exist; "
                     "ask for fewer or use more digits")
  rng = _rng(seed, f"{split}/{digits}")
  out, seen = [], set()
  while len(out) < n:
    pairs = rng.integers(0, 10 ** digits, size=(max(64, 2 * (n - len(out))), 2))
    for a, b in pairs.tolist():
      if split_of(a, b, held_out_fraction) != split or (unique and (a, b) in seen):
        continue
      seen.add((a, b))
      out.append(Problem(a, b))
      if len(out) == n:
        break
  return out


def pretrain_documents(n_docs: int, per_doc: int = 8, seed: int = 0, digits: int = 3,
                       split: str = "train") -> list[str]:
  """n_docs documents of per_doc problems, one a line ("a+b=c\\n" each)."""
  flat = problems(n_docs * per_doc, split, seed, digits, unique=False)
  return ["".join(p.text for p in flat[i * per_doc:(i + 1) * per_doc]) for i in range(n_docs)]


def near_miss(problem: Problem, rng: np.random.Generator) -> str:
  """A wrong answer close to the right one: one digit changed, off by 1 or 2, or off by a power of
  ten (a dropped or doubled carry). Never the sum, never negative, no leading zero."""
  answer = problem.a + problem.b
  digits = str(answer)
  while True:
    kind = int(rng.integers(3))
    if kind == 0:
      i = int(rng.integers(len(digits)))
      options = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
      wrong = int(digits[:i] + str(rng.choice(options)) + digits[i + 1:])
    elif kind == 1:
      wrong = answer + int(rng.choice([-2, -1, 1, 2]))
    else:
      wrong = answer + int(rng.choice([-1, 1])) * 10 ** int(rng.integers(1, len(digits) + 1))
    if wrong >= 0 and wrong != answer:
      return str(wrong)


# --- post-training records (formats in jaxlm/posttrain/datasets.py and chat.py) -------------------


def sft_records(n: int, seed: int = 0, digits: int = 3) -> list[dict]:
  """{"prompt": "a+b=", "completion": "c\\n"} for n training problems."""
  return [{"prompt": p.prompt, "completion": p.completion} for p in problems(n, "train", seed, digits)]


def preference_records(n: int, seed: int = 0, digits: int = 3, split: str = "train") -> list[dict]:
  """{"prompt", "chosen": the sum, "rejected": a near miss} (each completion ends in a newline)."""
  rng = _rng(seed, f"near-miss/{digits}/{split}")
  return [{"prompt": p.prompt, "chosen": p.completion, "rejected": near_miss(p, rng) + ANSWER_END}
          for p in problems(n, split, seed, digits)]


def kto_records(n: int, seed: int = 0, digits: int = 3, split: str = "train") -> list[dict]:
  """{"prompt", "completion", "label"}: alternately the sum (True) and a near miss (False)."""
  rng = _rng(seed, f"kto/{digits}/{split}")
  out = []
  for i, p in enumerate(problems(n, split, seed, digits)):
    good = i % 2 == 0
    out.append({"prompt": p.prompt, "completion": p.completion if good else near_miss(p, rng) + ANSWER_END,
                "label": good})
  return out


def rl_records(n: int, seed: int = 0, digits: int = 3, split: str = "train") -> list[dict]:
  """{"prompt": "a+b=", "answer": "c"}: prompts to sample from, graded by `reward`."""
  return [{"prompt": p.prompt, "answer": p.answer} for p in problems(n, split, seed, digits)]


def reward(completion: str, answer: str) -> float:
  """1.0 when the completion's text before its first newline is exactly the answer, else 0.0."""
  return 1.0 if completion.split(ANSWER_END, 1)[0] == answer else 0.0


# --- exact-match evaluation ---------------------------------------------------------------------


def answers(graphdef, params, tokenizer, problem_list, batch_size: int = 256) -> list[str]:
  """The model's greedy completions of [<s>] + "a+b=", each cut before its newline (eos removed).

  Rows stop at the first newline, at eos or after digits + 2 tokens (the longest sum and its
  newline); batches of batch_size rows.
  """
  from jaxlm.inference.decode import generate_batch  # pylint: disable=g-import-not-at-top

  newline = tokenizer.encode(ANSWER_END)
  longest = max(len(tokenizer.encode(p.completion)) for p in problem_list)
  max_new = longest + 1
  out = []
  for start in range(0, len(problem_list), batch_size):
    chunk = problem_list[start:start + batch_size]
    ids = [prompt_text.encode(tokenizer, p.prompt) for p in chunk]
    done = generate_batch(graphdef, params, ids, max_new_tokens=max_new, eos_id=tokenizer.eos_id,
                          stop_sequences=[newline])
    for prompt_ids, tokens, finish in zip(ids, done.tokens, done.finish):
      tokens = list(tokens[:-1]) if finish == "eos" else list(tokens)
      text = prompt_text.decode_new(tokenizer, prompt_ids, tokens)
      out.append(text.split(ANSWER_END, 1)[0])
  return out


def accuracy(model_answers, problem_list) -> float:
  """Fraction of problems whose answer text is exactly the sum."""
  if len(model_answers) != len(problem_list):
    raise ValueError(f"{len(model_answers)} answers for {len(problem_list)} problems")
  return float(np.mean([a == p.answer for a, p in zip(model_answers, problem_list)]))


def exact_match(graphdef, params, tokenizer, problem_list=None, *, n: int = 500, seed: int = 0,
                digits: int = 3, batch_size: int = 256) -> float:
  """Held-out exact-match accuracy of greedy decoding: n held-out problems of `digits` digits
  (or `problem_list`)."""
  problem_list = problems(n, "eval", seed, digits) if problem_list is None else list(problem_list)
  return accuracy(answers(graphdef, params, tokenizer, problem_list, batch_size), problem_list)


# --- data on disk -------------------------------------------------------------------------------


def _write_jsonl(path: str, texts) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")


def write_pretrain_data(directory: str, *, digits: int = 3, train_docs: int = 40_000,
                        eval_docs: int = 250, per_doc: int = 8, seed: int = 0) -> str:
  """train.jsonl, eval.jsonl (held-out problems only), the byte tokenizer's files and a manifest,
  written into `directory` unless its manifest already records the same settings. Atomic: files
  are written to a temporary folder and moved in, so concurrent writers never see half a file.
  Returns the directory."""
  from jaxlm.posttrain.byte_tokenizer import write_byte_tokenizer  # pylint: disable=g-import-not-at-top

  settings = {"digits": digits, "train_docs": train_docs, "eval_docs": eval_docs,
              "per_doc": per_doc, "seed": seed, "held_out_fraction": HELD_OUT_FRACTION}
  manifest = os.path.join(directory, MANIFEST)
  if os.path.isfile(manifest):
    with open(manifest, encoding="utf-8") as f:
      if json.load(f) == settings:
        return directory
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    _write_jsonl(os.path.join(tmp, "train.jsonl"), pretrain_documents(train_docs, per_doc, seed, digits))
    _write_jsonl(os.path.join(tmp, "eval.jsonl"),
                 pretrain_documents(eval_docs, per_doc, seed, digits, split="eval"))
    write_byte_tokenizer(tmp)
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(settings, f, indent=2)
    for name in sorted(os.listdir(tmp), key=lambda n: n == MANIFEST):  # the manifest last
      os.replace(os.path.join(tmp, name), os.path.join(directory, name))
  return directory


def write_sft_data(directory: str, *, digits: int = 3, n: int = 20_000, seed: int = 0) -> str:
  """sft_train.jsonl ({"prompt", "completion"} of n training-side problems) and sft_eval.jsonl
  (held-out ones, for the validation loss) in `directory`, unless already there. Returns it."""
  return _write_records(directory, {
      "sft_train.jsonl": lambda: sft_records(n, seed, digits),
      "sft_eval.jsonl": lambda: [{"prompt": p.prompt, "completion": p.completion}
                                 for p in problems(min(n, 300), "eval", seed, digits)]})


_RECORDS = {"preference": preference_records, "kto": kto_records}


def write_records(directory: str, kind: str, *, digits: int = 3, n: int = 20_000, n_eval: int = 512,
                  seed: int = 0) -> tuple[str, str]:
  """<kind>_train.jsonl (n training-side problems) and <kind>_eval.jsonl (n_eval held-out ones)
  of preference or kto records in `directory`, unless already there. Returns their paths."""
  make = _RECORDS[kind]
  names = {f"{kind}_train.jsonl": lambda: make(n, seed, digits),
           f"{kind}_eval.jsonl": lambda: make(n_eval, seed, digits, split="eval")}
  _write_records(directory, names)
  return tuple(os.path.join(directory, name) for name in names)


def _write_records(directory: str, names: dict) -> str:
  """Each name's records (made by calling its value) as JSONL, written atomically unless present."""
  os.makedirs(directory, exist_ok=True)
  for name, records in names.items():
    path = os.path.join(directory, name)
    if os.path.exists(path):
      continue
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in records())
    os.replace(f.name, path)
  return directory


def write_rl_data(directory: str, *, digits: int = 3, n: int = 20_000, n_eval: int = 500,
                  seed: int = 0) -> str:
  """rl_train.jsonl ({"prompt", "answer"} of n training-side problems) and rl_eval.jsonl (the
  n_eval held-out problems `exact_match` grades, in its order) in `directory`, unless already
  there. Returns it."""
  return _write_records(directory, {
      "rl_train.jsonl": lambda: rl_records(n, seed, digits),
      "rl_eval.jsonl": lambda: rl_records(n_eval, seed, digits, split="eval")})


def run_digits(config) -> int | None:
  """The digits a run's training data was written with (its data directory's manifest), or None."""
  first = config.data.train_paths.split(",")[0].strip()
  manifest = os.path.join(os.path.dirname(first), MANIFEST)
  if not first or not os.path.isfile(manifest):
    return None
  with open(manifest, encoding="utf-8") as f:
    return int(json.load(f)["digits"])


def _main(argv) -> None:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(prog="python -m jaxlm.posttrain.addition", description=__doc__.split("\n")[0])
  parser.add_argument("--write_data", metavar="DIR", help="write the pretraining corpus and tokenizer here")
  parser.add_argument("--eval", action="store_true", help="held-out exact match of --workdir's run")
  parser.add_argument("--workdir", help="train.workdir of a run (its latest checkpoint)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
  parser.add_argument("--n", type=int, default=500, help="held-out problems to grade")
  parser.add_argument("--digits", type=int, default=0, help="0: as the run's data manifest says (else 3)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not args.write_data and not args.eval:
    parser.error("give --write_data=DIR and/or --eval --workdir=RUN")
  if args.write_data:
    write_pretrain_data(args.write_data, digits=args.digits or 3, seed=args.seed)
    print(f"wrote {args.write_data}")
  if args.eval:
    if not args.workdir:
      parser.error("--eval needs --workdir")
    import time  # pylint: disable=g-import-not-at-top

    from jaxlm import runs  # pylint: disable=g-import-not-at-top

    try:
      run = runs.load_params(args.workdir, args.step)
    except runs.CheckpointError as e:
      sys.exit(f"jaxlm: {e}")
    digits = args.digits or run_digits(run.config) or 3
    start = time.perf_counter()
    acc = exact_match(run.graphdef, run.params, run.tokenizer, n=args.n, seed=args.seed, digits=digits)
    print(json.dumps({"workdir": args.workdir, "step": run.step, "digits": digits, "n": args.n,
                      "exact_match": acc, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
  _main(sys.argv[1:])
