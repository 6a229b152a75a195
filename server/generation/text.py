"""Generated token ids to answer text, done one way for every generator: streaming detokenisation that holds
back incomplete characters and the start of a stop string, and the token ids that end an answer."""

from contextlib import nullcontext


class IncrementalText:
    """Feed generated token ids with :meth:`add`; get only the text that is final.

    Each step decodes a short window (the tokens since the text last grew, plus the ones before them for the
    tokenizer's spacing rules), so a long answer costs the same per token as a short one. A window that ends
    inside a multi-byte character waits for the next token.
    """

    def __init__(self, tokenizer, *, stop_token_ids=frozenset(), stop: tuple[str, ...] = (), lock=None):
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop = tuple(s for s in stop if s)
        # Text that may still become the start of a stop string: the last (longest stop - 1) characters.
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._lock = lock or nullcontext()  # a Rust tokenizer shared across threads needs one
        self._ids: list[int] = []
        self._prefix = 0  # decode window start
        self._read = 0  # tokens before this are in ``_text``
        self._text = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        """The answer so far (whole characters only), including what is still held back."""
        return self._text

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """New final text for ``tokens``, and whether a stop string ended the answer (text cut before it)."""
        kept = [t for t in tokens if t not in self.stop_token_ids]
        if kept:
            self._ids.extend(kept)
            self._decode(final=False)
        hits = [i for i in (self._text.find(s, max(0, self._emitted - self._hold)) for s in self.stop) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        return self._take(len(self._text) - self._hold), False

    def flush(self) -> str:
        """Everything not yet returned (the answer ended for another reason than a stop string)."""
        self._decode(final=True)
        return self._take(len(self._text))

    def _decode(self, *, final: bool) -> None:
        window = self._ids[self._prefix :]
        with self._lock:
            before = self.tokenizer.decode(window[: self._read - self._prefix], skip_special_tokens=True)
            after = self.tokenizer.decode(window, skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _take(self, end: int) -> str:
        piece = self._text[self._emitted : end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return piece


def eos_token_ids(configured, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's ``eos_token_id`` (an id, a list or None) plus the
    tokenizer's eos. Chat models often end a turn with a token (ChatML's <|im_end|>) other than the tokenizer's."""
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids



