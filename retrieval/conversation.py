"""The search query for a conversation: a follow-up such as "And the pH one?" is searched together with the
question it follows, since on its own it names nothing to find. No second model: a short or anaphoric last
turn is prefixed with the previous user turn; a self-contained question is searched as it is."""

import re
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Words that carry no topic: a turn made only of these and a few others leans on the turn before it.
_FUNCTION_WORDS = frozenset(
    """a an and the of to in on for with about what which who how when where why is are was were be do does did
    can could should would will it its this that these those they them their one ones same also too then so
    there here please tell me us you your i my our any some more other another else again""".split()
)
_REFERRING = frozenset("it its this that these those they them their one ones same".split())
_OPENERS = ("and ", "also ", "what about ", "how about ", "and what", "same for ", "what of ")
# A turn with at most this many topic words is read as a follow-up ("And the pH one?": 'ph').
MAX_FOLLOW_UP_TOPIC_WORDS = 2


def is_follow_up(turn: str) -> bool:
    """Whether ``turn`` reads as a continuation of the previous question rather than a question of its own."""
    text = turn.strip().lower()
    words = _WORD.findall(text)
    if not words:
        return False
    topic = [word for word in words if word not in _FUNCTION_WORDS]
    if text.startswith(_OPENERS) and len(topic) <= 4:
        return True
    if len(topic) <= MAX_FOLLOW_UP_TOPIC_WORDS:
        return True
    return any(word in _REFERRING for word in words) and len(topic) <= 3


def search_query(user_turns: Sequence[str]) -> str:
    """What to retrieve for the last of ``user_turns`` (the conversation's user messages, oldest first)."""
    turns = [turn.strip() for turn in user_turns if turn.strip()]
    if not turns:
        return ""
    last = turns[-1]
    if len(turns) < 2 or not is_follow_up(last):
        return last
    return f"{turns[-2]} {last}"
