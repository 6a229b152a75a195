"""Token ids to streamed text: holds back incomplete characters and anything that may start a stop string."""


class IncrementalText:
    """Feed generated token ids with :meth:`add`; get only the text that is final."""

    def __init__(self, tokenizer, *, stop_token_ids=frozenset(), stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._emitted = 0
        self._text = ""

    def add(self, tokens: list[int]) -> tuple[str, bool]:
        """New final text for ``tokens``, and whether a stop string ended the answer (text cut before it)."""
        kept = [t for t in tokens if t not in self.stop_token_ids]
        if kept:
            self._ids.extend(kept)
            self._text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        settled = self._text.rstrip("\ufffd")  # a multi-byte character still missing bytes
        hits = [i for i in (settled.find(s, max(0, self._emitted - self._hold)) for s in self.stop) if i >= 0]
        if hits:
            return self._take(min(hits)), True
        return self._take(max(self._emitted, len(settled) - self._hold)), False

    def flush(self) -> str:
        """Everything not yet returned (the answer ended for another reason than a stop string)."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece
