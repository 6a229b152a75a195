"""The JSON manifest beside each tenant index: format version, embedder and index type, written atomically."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from core.atomic import write_atomically
from core.errors import Conflict, LoragError

# 1: one vector per chunk, FAISS id = chunk rowid. 2: one vector per sentence window, FAISS id = rowid * 1024 +
# window (retrieval.store), chunks carry their window spans. A version-1 index is refused, not converted:
# its vectors are whole-chunk embeddings, which would rank unfairly against windows mixed into it.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class IndexManifest:
    embedder_name: str
    dimension: int
    index_type: str
    created_at: str
    format_version: int = FORMAT_VERSION

    def check_embedder(self, *, embedder_name: str, dimension: int, where: Path) -> None:
        """Refuse to mix vectors from two embedders in one index.

        Raises:
            Conflict: the stored embedder name or dimension differs from the requested one.
        """
        if self.embedder_name != embedder_name or self.dimension != dimension:
            raise Conflict(
                f"index {str(where)!r} was built with embedder {self.embedder_name!r} (dimension "
                f"{self.dimension}), not {embedder_name!r} (dimension {dimension})",
                hint="Set embedding.model back to the stored one, or re-ingest into a fresh tenant",
            )


def read_manifest(directory: Path) -> IndexManifest | None:
    """The manifest in ``directory``, or None when there is none (no index yet).

    Raises:
        LoragError: the file is unreadable, not a manifest, or from a newer format.
    """
    path = Path(directory) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise LoragError(f"cannot read index manifest {str(path)!r}: {error}") from error
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version == 1:
        raise LoragError(
            f"index {str(directory)!r} was written by an older lorag (format 1: one vector per chunk); this lorag "
            f"reads format {FORMAT_VERSION} (one vector per sentence window)",
            hint=f"Move that folder aside and ingest the documents again: mv {str(directory)!r} "
            f"{str(directory) + '.format1'!r}, then lorag ingest PATH --tenant TENANT (`lorag docs` on an older "
            "lorag lists the ingested files)",
        )
    if version != FORMAT_VERSION:
        raise LoragError(
            f"index manifest {str(path)!r} has format_version {version!r}, this lorag reads {FORMAT_VERSION}",
            hint="Re-ingest the tenant's documents with this version of lorag",
        )
    try:
        return IndexManifest(
            embedder_name=str(raw["embedder_name"]),
            dimension=int(raw["dimension"]),
            index_type=str(raw["index_type"]),
            created_at=str(raw["created_at"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LoragError(f"index manifest {str(path)!r} is missing or has a bad field: {error}") from error


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    write_atomically(Path(directory) / MANIFEST_NAME, json.dumps(asdict(manifest), indent=2).encode())
