"""Turns the paths given to ``lorag ingest`` into the list of files to load, walking folders safely.

Folders are walked recursively; symlinks are followed but each real directory and file is visited
once, so symlink loops cannot hang the walk. Hidden and unsupported files are skipped with a note; links that lead
nowhere (a loop, a link to itself, a missing target) are reported naming the links.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from ingest.loaders import detect_format


@dataclass
class Discovery:
    files: list[Path] = field(default_factory=list)  # absolute paths, in walk order, each real file once
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) worth one note each
    missing: list[Path] = field(default_factory=list)  # named on the command line but absent
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # folders whose listing failed, with why
    broken_links: list[tuple[Path, str]] = field(default_factory=list)  # (link, the loop or missing target)
    # file -> the name clients are shown: its path relative to the folder given (a file given by itself: its name)
    names: dict[Path, str] = field(default_factory=dict)


def discover_files(paths: list[Path]) -> Discovery:
    """Every supported file under ``paths`` (files or folders), sorted within each folder."""
    found = Discovery()
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    for given in paths:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            _walk(path, found, seen_files, seen_dirs)
        elif path.is_file():
            _add_file(path, found, seen_files, named=True, name=path.name)
        else:
            found.missing.append(path)
    return found


def _walk(root: Path, found: Discovery, seen_files: set[str], seen_dirs: set[str]) -> None:
    real_root = os.path.realpath(root)
    if real_root in seen_dirs:
        return
    seen_dirs.add(real_root)
    def unreadable(error: OSError) -> None:  # os.walk would otherwise drop the folder without a word
        found.unreadable.append((Path(error.filename), f"cannot read folder: {error.strerror}"))

    for directory, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        keep = []
        for name in sorted(dirnames):
            sub = Path(directory) / name
            real = os.path.realpath(sub)
            if name.startswith("."):
                found.skipped.append((sub, "hidden folder"))
            elif real in seen_dirs:  # a symlink back into the tree (or a loop): already walked
                continue
            else:
                seen_dirs.add(real)
                keep.append(name)
        dirnames[:] = keep  # os.walk descends only into what is left here
        for name in sorted(filenames):
            path = Path(directory) / name
            if name.startswith("."):
                found.skipped.append((path, "hidden file"))
            else:
                _add_file(path, found, seen_files, named=False, name=path.relative_to(root).as_posix())


def _add_file(path: Path, found: Discovery, seen_files: set[str], *, named: bool, name: str) -> None:
    if detect_format(path) is None:
        found.skipped.append((path, f"unsupported file type {path.suffix or '(no extension)'!r}"))
        return
    if path.is_symlink() and not path.exists():
        found.broken_links.append((path, describe_broken_link(path)))
        return
    if not path.is_file():  # socket, fifo, device
        found.skipped.append((path, "not a regular file"))
        return
    real = os.path.realpath(path)
    if real in seen_files:
        return
    seen_files.add(real)
    found.files.append(path)
    found.names[path] = name


MAX_LINK_HOPS = 40  # as the kernel's own limit on nested links


def describe_broken_link(link: Path) -> str:
    """Why following ``link`` reaches no file, naming each link on the way: "symbolic link loop: a.pdf -> b.pdf ->
    a.pdf", "symbolic link to itself: a.pdf -> a.pdf" or "dangling symbolic link: a.pdf -> gone.pdf"."""
    hops = [str(link.name)]
    current = os.path.abspath(link)
    visited = [current]
    for _ in range(MAX_LINK_HOPS):
        try:
            target = os.readlink(current)
        except OSError:  # not a link (a folder link on the way loops or is missing)
            break
        following = os.path.normpath(os.path.join(os.path.dirname(current), target))
        hops.append(target)
        if following == current:
            return f"symbolic link to itself: {' -> '.join(hops)}"
        if following in visited:
            return f"symbolic link loop: {' -> '.join(hops)}"
        if not os.path.lexists(following):
            return f"dangling symbolic link: {' -> '.join(hops)} (no such file)"
        visited.append(following)
        current = following
    return f"symbolic link that resolves to no file: {' -> '.join(hops)} (a loop through a linked folder?)"
