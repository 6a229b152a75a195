"""Chat clients' housekeeping prompts: Open WebUI asks the chat's own model for a title, tags, follow-up
questions and search queries. Those prompts are about the conversation, not the documents, so they are
answered without retrieval (``server.skip_retrieval_for_task_prompts``).
"""

import re

# Open WebUI's default task templates (DEFAULT_*_PROMPT_TEMPLATE in its config) open with "### Task:" and quote
# the conversation inside <chat_history>; a user question almost never does both.
_TASK_HEADER = re.compile(r"\A\s*###\s*Task:", re.IGNORECASE)


def is_task_prompt(text: str) -> bool:
    """True for a housekeeping prompt such as Open WebUI's title or tag generation."""
    return bool(_TASK_HEADER.match(text)) and "<chat_history>" in text
