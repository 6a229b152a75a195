"""ALCE-style citation quality: precision, recall, page accuracy and the share of answers citing nothing.

A cited passage *supports* the answer when its normalised text contains a gold answer or the gold
evidence text; with an NLI model configured (``--nli-model``), also when the passage entails the answer.
"""

import logging
from collections.abc import Sequence

from core.prompt import strip_markers
from evaluation.datasets import EvalQuestion, normalise_text, same_document

log = logging.getLogger(__name__)


class NliJudge:
    """A cross-encoder NLI model (sentence-transformers) deciding whether a passage entails a claim."""

    def __init__(self, model, entailment_index: int):
        self.model = model
        self.entailment_index = entailment_index

    def entails(self, premise: str, hypothesis: str) -> bool:
        scores = self.model.predict([(premise, hypothesis)])[0]  # (labels,) logits
        return int(scores.argmax()) == self.entailment_index


def load_nli(name: str | None, *, device: str | None = None) -> NliJudge | None:
    """The NLI judge for model ``name``; None (logged) when none is configured or it cannot be loaded."""
    if not name:
        return None
    try:
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(name, device=device)
        labels = {str(label).lower(): int(index) for index, label in model.model.config.id2label.items()}
        index = next(i for label, i in labels.items() if label.startswith("entail"))
    except Exception as error:  # noqa: BLE001 - an optional judge: every failure means "skip it"
        log.warning("NLI model %r is not available (%s: %s); citations are judged by text containment only",
                    name, type(error).__name__, error)
        return None
    return NliJudge(model, index)


def supports(passage, question: EvalQuestion, *, claim: str = "", nli: NliJudge | None = None) -> bool:
    """Whether ``passage`` (anything with ``text``) holds the evidence for ``question``'s gold answer."""
    text = normalise_text(passage.text)
    for needle in (*question.answers, *question.evidence):
        needle = normalise_text(needle)
        if needle and needle in text:
            return True
    return bool(nli and claim.strip() and nli.entails(passage.text, claim))


def citation_scores(
    answer: str, citations: Sequence, question: EvalQuestion, *, nli: NliJudge | None = None
) -> dict[str, float | None]:
    """Citation metrics of one answer; None where a metric does not apply to it.

    - ``citation_precision``: share of the cited passages that support the answer (None: nothing cited).
    - ``citation_recall``: 1.0 when at least one cited passage supports the gold answer (None: unanswerable).
    - ``page_accuracy``: share of citations on a gold document's gold page (None: nothing cited, or no gold page).
    - ``no_citation``: 1.0 when the answer cites nothing.
    """
    claim = " ".join(strip_markers(answer).split())
    if question.unanswerable:
        return {"citation_precision": None, "citation_recall": None, "page_accuracy": None,
                "no_citation": float(not citations)}
    flags = [supports(c, question, claim=claim, nli=nli) for c in citations]
    paged = [g for g in question.sources if g.page is not None]
    page_hits = [any(same_document(c.source, g.doc) and c.page == g.page for g in paged) for c in citations]
    return {
        "citation_precision": sum(flags) / len(flags) if flags else None,
        "citation_recall": float(any(flags)),
        "page_accuracy": sum(page_hits) / len(page_hits) if paged and citations else None,
        "no_citation": float(not citations),
    }
