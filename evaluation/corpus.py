"""Ingests the corpus a question set brings (SQuAD contexts, BEIR documents) into a tenant, idempotently.

Documents are written as ``<data_dir>/eval-corpora/<set>/<doc>.txt`` and ingested with the normal
pipeline, so a second run finds them unchanged and gold documents match by file name.
"""

import re
from pathlib import Path

from core.errors import LoragError
from evaluation.datasets import QuestionSet


def ingest_corpus(questions: QuestionSet, *, tenant: str, settings, embedder=None) -> Path:
    """Write and ingest ``questions.documents``; documents of earlier runs that are no longer kept are removed.

    Raises:
        LoragError: the set brings no corpus (lorag JSONL: ingest the documents with ``lorag ingest``),
            or a document failed to ingest.
    """
    from ingest.pipeline import ingest_paths

    if not questions.documents:
        raise LoragError(
            f"question set {questions.name!r} ({questions.format}) brings no documents to ingest",
            hint=f"Ingest the documents it asks about with `lorag ingest PATH --tenant {tenant}`",
        )
    root = Path(settings.data_dir) / "eval-corpora" / re.sub(r"[^A-Za-z0-9_.-]+", "_", questions.name)
    root.mkdir(parents=True, exist_ok=True)
    wanted = {f"{name}.txt": text for name, text in questions.documents.items()}
    for stale in root.glob("*.txt"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        path = root / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    report = ingest_paths([root], tenant=tenant, settings=settings, embedder=embedder, prune=True)
    if report.failed:
        raise LoragError(f"{report.failed} documents of {str(root)!r} failed to ingest for tenant {tenant!r}")
    return root
