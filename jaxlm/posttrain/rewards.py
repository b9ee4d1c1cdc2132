"""Reward functions of the RL objectives (grpo, ppo), registered by name.

A reward function maps (completion text, record) -> float: the completion is the sampled text
after the prompt (the eos that ended it, if any, is not part of it), the record is the RL record it
answers ({"prompt", "answer"?, ...}, jaxlm/posttrain/datasets.py). posttrain.rewards names one or
more, comma-separated; a completion's reward is their sum, and each is also logged on its own.

Adding one: decorate a function with `@register("name")` (needs=("answer",) when it reads a record
field, so a dataset without that field is refused at start-up rather than midway).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from jaxlm.config import ConfigError

ANSWER_END = "\n"  # the end of an answer in the tasks these rewards grade


class Reward(NamedTuple):
  name: str
  fn: Callable[[str, dict], float]
  needs: tuple[str, ...]  # record fields it reads


REGISTRY: dict[str, Reward] = {}


def register(name: str, needs: tuple[str, ...] = ()):
  """Decorator: registers fn(completion, record) -> float under `name`."""
  def wrap(fn):
    if name in REGISTRY:
      raise ValueError(f"a reward named {name!r} is already registered")
    REGISTRY[name] = Reward(name, fn, tuple(needs))
    return fn
  return wrap


def resolve(names: str) -> list[Reward]:
  """posttrain.rewards text -> the Rewards it names, in order; ConfigError listing the registered
  ones for an unknown or empty name."""
  out = []
  for name in (n.strip() for n in str(names).split(",")):
    if name not in REGISTRY:
      raise ConfigError(f"config field 'posttrain.rewards': {name!r} is not a registered reward; "
                        f"use a comma-separated list of {sorted(REGISTRY)} (jaxlm/posttrain/rewards.py)")
    if name in (r.name for r in out):
      raise ConfigError(f"config field 'posttrain.rewards' names {name!r} twice; name it once")
    out.append(REGISTRY[name])
  return out


def check_records(rewards: list[Reward], records: list[dict], where: str) -> None:
  """ConfigError when a record lacks a field one of the rewards reads."""
  for reward in rewards:
    for field in reward.needs:
      missing = sum(1 for r in records if field not in r)
      if missing:
        raise ConfigError(f"reward {reward.name!r} reads each record's {field!r}, but {missing} of "
                          f"the {len(records)} records in {where} lack it; add it or choose other "
                          "posttrain.rewards")


def score(rewards: list[Reward], completions: list[str], records: list[dict]
          ) -> tuple[list[float], dict[str, list[float]]]:
  """(summed reward per completion, {reward name: its value per completion})."""
  each = {r.name: [float(r.fn(c, rec)) for c, rec in zip(completions, records)] for r in rewards}
  total = [sum(values) for values in zip(*each.values())]
  return total, each


@register("exact_match", needs=("answer",))
def exact_match(completion: str, record: dict) -> float:
  """1 when the text before the first newline is exactly the record's answer, else 0."""
  return 1.0 if completion.split(ANSWER_END, 1)[0] == str(record["answer"]) else 0.0


@register("digit_match", needs=("answer",))
def digit_match(completion: str, record: dict) -> float:
  """Partial credit for a numeric answer: the fraction of its characters, aligned from the right
  (units with units), that the text before the first newline has in the same place, over the
  longer of the two; 1 exactly when exact_match is 1."""
  given, answer = completion.split(ANSWER_END, 1)[0], str(record["answer"])
  width = max(len(given), len(answer))
  if not width:
    return 0.0
  given, answer = given.rjust(width, "\0"), answer.rjust(width, "\1")
  return sum(g == a for g, a in zip(given, answer)) / width


_DIGITS_THEN_END = re.compile(r"[0-9]+\n")
_DIGITS = re.compile(r"[0-9]+")


def format_reward(completion: str, record: dict) -> float:  # pylint: disable=unused-argument
  """The shape of a numeric answer, with partial credit: digits then a newline 1; digits that
  never ended (eos or the length limit) 0.5; a digit first but something else after it 0.25;
  anything else 0."""
  if _DIGITS_THEN_END.fullmatch(completion):
    return 1.0
  if _DIGITS.fullmatch(completion):
    return 0.5
  return 0.25 if completion and completion[0] in "0123456789" else 0.0


register("format")(format_reward)
