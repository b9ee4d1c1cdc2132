"""Each fault injected into a real training subprocess (configs/tiny.py, 12 steps, a checkpoint
every 4), and the promise it must keep: no step lost to SIGTERM, at most checkpoint.every to
SIGKILL, nothing written destroyed, and the resumed run's final parameters bitwise equal to the
uninterrupted run's wherever the fault lost no data. `python benchmarks/faults.py` prints the same
scenarios as a table."""

import os

import pytest

from faults import harness
from faults.harness import EVERY


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  return harness.Scenarios(str(base), str(base / "tokenizers"))


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_step_loses_no_step_and_resumes_bit_for_bit(scenarios, processes):
  """With 2 processes the signal reaches one; both save the same step and exit 75."""
  row = scenarios.sigterm(processes=processes)
  assert row.steps_lost == 0 and row.data_lost == "none" and row.params_equal, row


def test_sigkill_mid_save_loses_at_most_one_checkpoint_interval(scenarios):
  row = scenarios.kill_in_save()
  assert row.steps_lost <= EVERY and row.data_lost == "none" and row.params_equal, row


@pytest.mark.parametrize("option", ["--nan_at=6", "--inf_lr_at=6"])
def test_a_non_finite_step_is_skipped_and_training_goes_on(scenarios, option):
  row = scenarios.nonfinite(option.strip("-").split("=")[0], option)
  assert row.notes == "skipped_steps 1" and not row.params_equal, row


def test_a_dead_peer_ends_the_survivor_naming_it_and_a_relaunch_resumes(scenarios):
  row = scenarios.dead_peer(timeout=10)
  assert "process(es) [1] of 2 stopped answering" in row.notes, row
  assert row.steps_lost <= EVERY and row.data_lost == "none" and row.params_equal, row
