"""What one ingest run did to each file, and the summary table that ends ``lorag ingest``."""

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal

from ingest.progress import chunks_per_second

Status = Literal["added", "updated", "unchanged", "removed", "failed", "skipped"]
STATUSES: tuple[Status, ...] = ("added", "updated", "unchanged", "removed", "failed", "skipped")


@dataclass
class FileOutcome:
    source: str
    status: Status
    reason: str = ""  # why it failed or was skipped
    pages: int = 0
    chunks: int = 0  # chunks embedded and stored for this file in this run
    warnings: list[str] = field(default_factory=list)


@dataclass
class IngestReport:
    tenant: str
    outcomes: list[FileOutcome] = field(default_factory=list)
    seconds: float = 0.0
    # From the first file to the last one embedded: what chunks/s is measured over, by the bar and the summary
    # alike. ``seconds`` also counts discovery, opening the index and the final commit.
    processing_seconds: float = 0.0
    commits: int = 0

    def add(self, outcome: FileOutcome) -> FileOutcome:
        self.outcomes.append(outcome)
        return outcome

    def count(self, status: Status) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def chunks_embedded(self) -> int:
        return sum(outcome.chunks for outcome in self.outcomes)

    def of(self, status: Status) -> list[FileOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == status]

    def to_dict(self) -> dict:
        return {
            "tenant": self.tenant,
            "counts": {status: self.count(status) for status in STATUSES},
            "chunks_embedded": self.chunks_embedded,
            "seconds": round(self.seconds, 3),
            "processing_seconds": round(self.processing_seconds, 3),
            "commits": self.commits,
            "files": [asdict(outcome) for outcome in self.outcomes],
        }

    def format_table(self) -> str:
        """Counts per outcome, chunks and time, as a small aligned table."""
        counts = Counter(outcome.status for outcome in self.outcomes)
        rows = [(status, str(counts.get(status, 0))) for status in STATUSES]
        rows.append(("chunks embedded", str(self.chunks_embedded)))
        rate = chunks_per_second(self.chunks_embedded, self.processing_seconds)
        rows.append(("seconds", f"{self.seconds:.1f} ({rate:.1f} chunks/s over {self.processing_seconds:.1f} s of "
                                "parsing and embedding, as the progress bar shows it)"))
        width = max(len(name) for name, _ in rows)
        lines = [f"ingest summary for tenant {self.tenant!r}"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)
