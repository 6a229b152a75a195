"""Which turns are follow-ups, and what gets searched for them."""

import pytest

from retrieval.conversation import is_follow_up, search_query


@pytest.mark.parametrize("turn", ["And the pH one?", "What about the battery?", "How is it done?", "Why?",
                                  "and for the Fleet plan", "Same for returns?"])
def test_short_or_anaphoric_turns_are_follow_ups(turn):
    assert is_follow_up(turn)


@pytest.mark.parametrize("turn", ["How long is the warranty on a Kestrel Tide buoy?",
                                  "What is the accuracy of the dissolved oxygen sensor?",
                                  "Within how many days can unused products be returned for a full refund?"])
def test_self_contained_questions_are_searched_as_they_are(turn):
    assert not is_follow_up(turn)
    assert search_query(["How often should the pH probe be calibrated?", turn]) == turn


def test_a_follow_up_is_searched_with_the_previous_user_turn():
    assert search_query(["How often should the pH probe be calibrated?", "And the oxygen one?"]) == (
        "How often should the pH probe be calibrated? And the oxygen one?")
    assert search_query(["And the oxygen one?"]) == "And the oxygen one?"  # nothing to lean on
    assert search_query(["  ", ""]) == ""
