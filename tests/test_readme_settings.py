"""The README's settings table lists every setting of the serving process, so it cannot drift from the code."""

import re
from pathlib import Path

from pydantic import BaseModel

from server.settings import ServerSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += setting_names(field.annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def documented_names(markdown: str) -> set[str]:
    """Names in the first column of the Configuration table; "`a.b` / `c`" documents a.b and a.c."""
    table = markdown.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        section = None
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "." in token:
                section = token.split(".", 1)[0]
                names.add(token)
            else:
                names.add(f"{section}.{token}" if section else token)
    return names


def test_every_server_setting_has_a_row():
    documented = documented_names(README.read_text(encoding="utf-8"))
    missing = [name for name in setting_names(ServerSettings) if name not in documented]
    assert not missing, f"settings missing from the README's Configuration table: {missing}"


def test_the_table_names_no_setting_that_does_not_exist():
    from core.settings import Settings
    from training.settings import TrainSettings

    known = set(setting_names(ServerSettings)) | set(setting_names(TrainSettings)) | set(setting_names(Settings))
    unknown = sorted(documented_names(README.read_text(encoding="utf-8")) - known)
    assert not unknown, f"the README's Configuration table names settings that do not exist: {unknown}"
