"""Paths named in a manifest stay inside the site.

A manifest cell (an image, a note file, any file a modality reads) is a path relative to the
manifest's folder, or an absolute path. Either way it is resolved with every symlink followed,
and it must land inside the manifest's folder or inside one of the site's *data roots*:

- ``data.roots`` in the study configuration: folders that every site has at the same place
  relative to its manifest (a relative root is taken from the manifest's folder, e.g.
  ``../shared-images``), or absolute;
- ``--data-root DIR`` on the command line (``validate``, ``train``, ``site check``,
  ``evaluate``), or ``data_roots=`` in the library: folders of this site only.

So ``../../../../etc/passwd``, ``/etc/passwd``, a symlinked note that points out of the site and
a symlink to another site's DICOM are refused, each with the reason, as that row's error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from clinfuse.errors import InputError

__all__ = ["data_roots", "resolve_site_path"]


def data_roots(manifest: str | os.PathLike[str], declared: Iterable[str | os.PathLike[str]] = (),
               extra: Iterable[str | os.PathLike[str]] = ()) -> tuple[Path, ...]:
    """The folders a manifest's paths may resolve into: its own folder, then ``declared``
    (``data.roots``; relative ones from the manifest's folder), then ``extra`` (command line;
    relative ones from the current directory). All resolved, symlinks followed. A root given on
    the command line must be a folder (:class:`InputError` otherwise); a declared one that this
    site lacks admits nothing."""
    base = Path(manifest).resolve().parent
    roots = [base]
    roots += [(base / Path(r).expanduser()).resolve() for r in declared]
    for root in extra:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise InputError("data root is not a folder", file=root, key="--data-root")
        roots.append(path)
    return tuple(dict.fromkeys(roots))


def resolve_site_path(cell: str, roots: tuple[Path, ...]) -> Path:
    """Resolve a manifest cell against ``roots[0]`` (the manifest's folder), following symlinks.

    Returns the absolute, resolved path. Raises ``ValueError`` with a message fit for the user
    when the cell is not a usable path or resolves outside every root. Does not check that the
    file exists (the caller says what kind of file is missing).
    """
    text = cell.strip()
    if "\x00" in text:
        raise ValueError("the path contains a NUL character")
    try:
        path = (roots[0] / text).resolve()  # a cell is data, not a shell word: no '~' expansion
    except (OSError, RuntimeError) as exc:  # symlink loops (RuntimeError before Python 3.13), ENAMETOOLONG
        raise ValueError(f"cannot resolve the path '{text}': {exc}") from None
    if not any(path.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        via = " through a symlink" if _has_symlink(roots[0], text) else ""
        raise ValueError(f"'{text}' resolves to {path}{via}, outside the site's data folders ({shown}); "
                         "move the file into the site, or declare its folder in data.roots or "
                         "with --data-root")
    return path


def _has_symlink(base: Path, text: str) -> bool:
    """Whether ``text`` (relative to ``base``) passes through a symlink on its way."""
    current = base
    for part in Path(text).parts:
        current = current / part
        try:
            if current.is_symlink():
                return True
        except OSError:
            return False
    return False
