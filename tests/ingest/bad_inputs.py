"""Writes one file per kind of bad input, each with the words its failure message must contain."""

import io
import os
import zlib
from pathlib import Path

from pypdf import PdfReader, PdfWriter
from pypdf.generic import DictionaryObject, NameObject, StreamObject

from tests.conftest import SAMPLE_DOCS

SAMPLE_PDF = SAMPLE_DOCS / "specs" / "kestrel-tide-datasheet.pdf"


def encrypted_pdf(*, user_password: str = "secret", algorithm: str | None = None) -> bytes:
    """The sample PDF encrypted (RC4 by default, or ``algorithm`` such as "AES-256"); an empty ``user_password``
    makes a file anyone may open, as many 'protected' PDFs are."""
    writer = PdfWriter(clone_from=PdfReader(SAMPLE_PDF))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm=algorithm)
    return _bytes(writer)


def image_only_pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(595, 842)  # a page with no text operators at all, like a scan
    writer.add_blank_page(595, 842)
    return _bytes(writer)


def bomb_pdf(repeat: int = 60_000) -> bytes:
    """One page whose 190 KB content stream inflates to ~120 MB of text-drawing operators."""
    writer = PdfWriter()
    page = writer.add_blank_page(200, 200)
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type1"),
            NameObject("/BaseFont"): NameObject("/Helvetica"),
        }
    )
    fonts = DictionaryObject({NameObject("/F1"): writer._add_object(font)})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
    stream = StreamObject()
    stream._data = zlib.compress((b"BT /F1 12 Tf 10 10 Td (" + b"A" * 2000 + b") Tj ET\n") * repeat, 9)
    stream[NameObject("/Filter")] = NameObject("/FlateDecode")
    page[NameObject("/Contents")] = writer._add_object(stream)
    return _bytes(writer)


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Write every bad file into ``folder``; returns file name -> words expected in its failure reason."""
    folder.mkdir(parents=True, exist_ok=True)
    sample = SAMPLE_PDF.read_bytes()
    files = {
        "encrypted.pdf": (encrypted_pdf(), "encrypted: a password is required"),
        "aes-password.pdf": (encrypted_pdf(algorithm="AES-256"), "encrypted: a password is required"),
        "truncated.pdf": (sample[: len(sample) // 3], "truncated"),
        "empty.md": (b"", "empty file"),
        "mislabeled.pdf": (b"<!DOCTYPE html><html><body><p>not a pdf</p></body></html>", "not a PDF (looks like HTML)"),
        "scanned.pdf": (image_only_pdf(), "OCR is not done"),
        "bomb.pdf": (bomb_pdf(), "safety limit"),
        "binary.txt": (b"\x00\x01\x02 binary \x00", "binary"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: words for name, (_, words) in files.items()}


def write_non_utf8_name(folder: Path) -> Path:
    """A file whose name is not valid UTF-8 (allowed by Linux file systems)."""
    raw = os.path.join(os.fsencode(folder), b"caf\xe9-latin1.txt")
    with open(raw, "wb") as handle:
        handle.write(b"a file with a Latin-1 name")
    return Path(os.fsdecode(raw))


def _bytes(writer: PdfWriter) -> bytes:
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()
