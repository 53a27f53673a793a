"""The pipeline's estimate of the time left, printed at the start of every stage."""

import pytest

from sait_tf.train.pipeline import remaining_seconds

PLAN = ["source_only", "oracle",
        "round_01_translator", "round_01_translate", "round_01_pseudo_labels",
        "round_01_segmenter",
        "round_02_translator", "round_02_translate", "round_02_pseudo_labels",
        "round_02_segmenter", "export"]
ROUND_1 = {"round_01_translator": 1000.0, "round_01_translate": 20.0,
           "round_01_pseudo_labels": 5.0, "round_01_segmenter": 200.0}


def test_round_one_predicts_round_two_and_an_untimed_kind_marks_the_estimate_incomplete():
    done = {"source_only": 100.0, "oracle": 90.0, **ROUND_1}
    assert remaining_seconds(PLAN, "round_02_translator", done) == (1225.0, False)
    assert remaining_seconds(PLAN, "export", {**done, "export": 15.0}) == (0.0, True)
    assert remaining_seconds(PLAN[:-1], "round_02_segmenter", done) == (200.0, True)


def test_before_a_kind_has_run_only_the_timed_kinds_count():
    done = {"source_only": 100.0, "oracle": 90.0, "round_01_translator": 1000.0}
    # Round 1's other stages and export are not timed yet; round 2's translator is.
    assert remaining_seconds(PLAN, "round_01_translate", done) == (1000.0, False)
    assert remaining_seconds(PLAN, "round_01_translator", {}) == (0.0, False)


def test_a_stage_outside_the_plan_is_refused():
    with pytest.raises(ValueError):
        remaining_seconds(PLAN, "round_03_translator", {})
