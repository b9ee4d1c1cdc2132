"""Each fault injected into a real training subprocess (configs/tiny.py, 12 steps, a checkpoint
every 4), and the promise it must keep: no step lost to SIGTERM, at most checkpoint.every to
SIGKILL, nothing written destroyed, and the resumed run's final parameters bitwise equal to the
uninterrupted run's wherever the fault lost no data. `python benchmarks/faults.py` prints the same
scenarios as a table."""

import os

import pytest

from faults import harness, inject
from faults.harness import EVERY

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  return harness.Scenarios(str(base), str(base / "tokenizers"), compile_cache=True, small_data=True,
                             fast_compile=True)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_step_loses_no_step_and_resumes_bit_for_bit(scenarios, processes):
  """With 2 processes the signal reaches one; both save the same step and exit 75."""
  row = scenarios.sigterm(processes=processes)
  assert row.steps_lost == 0 and row.data_lost == "none" and row.params_equal and row.kept, row


def test_sigkill_mid_save_loses_at_most_one_checkpoint_interval(scenarios):
  row = scenarios.kill_in_save()
  assert row.steps_lost <= EVERY and row.data_lost == "none" and row.params_equal and row.kept, row


def truncate(ckpt_dir, step):
  """A truncated array file (the newest step's largest, cut in half)."""
  return inject.truncate_newest_array(ckpt_dir)


@pytest.mark.parametrize("damage", [truncate, inject.remove_commit_marker, inject.remove_metadata],
                         ids=["truncated_array", "missing_commit_marker", "missing_metadata"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    scenarios, damage):
  row = scenarios.damaged(damage.__name__, damage)
  assert row.steps_lost == EVERY and row.data_lost == "none" and row.params_equal and row.kept, row


def test_a_full_disk_stops_the_run_keeping_earlier_checkpoints(scenarios):
  row = scenarios.full_disk()
  assert row.data_lost == "none" and row.params_equal and row.kept and "GiB free" in row.notes, row


def test_a_full_disk_with_on_save_error_warn_trains_on(scenarios):
  row = scenarios.full_disk_warn()
  assert row.data_lost == "none" and row.params_equal, row
  assert "checkpoint/save_errors [1.0]" in row.notes and "8" not in row.notes.split(",")[0], row


def test_a_run_moves_between_process_counts_without_changing_its_data(scenarios):
  row = scenarios.other_process_count()
  assert row.data_lost == "none" and row.params_equal and row.kept, row


def test_a_bad_jsonl_line_is_refused_by_line_or_skipped_and_counted(scenarios):
  row = scenarios.bad_record()
  assert row.params_equal and "skipped_records [1.0]" in row.data_lost, row


def test_a_non_finite_loss_and_a_non_finite_update_are_each_skipped_and_training_goes_on(scenarios):
  """Both faults in one run (one process start less): a NaN loss at step 6, an infinite update at
  step 9; the harness asserts each step's own "not applied" line."""
  row = scenarios.nonfinite("nan and inf lr", "--nan_at=6", "--inf_lr_at=9")
  assert row.notes == "skipped_steps 2" and not row.params_equal, row


def test_a_dead_peer_ends_the_survivor_naming_it_and_a_relaunch_resumes(scenarios):
  row = scenarios.dead_peer(timeout=10)
  assert "process(es) [1] of 2 stopped answering" in row.notes, row
  assert row.steps_lost <= EVERY and row.data_lost == "none" and row.params_equal and row.kept, row
