"""Which file names a dataset may use: the rule every reader of annotation files applies (kept
free of heavy imports: `panoptic pq` checks names before anything else loads)."""

from __future__ import annotations


class UnsafeFileName(ValueError):
    """A ``file_name`` that is not a plain relative name inside its folder."""


def file_name_problem(name) -> str | None:
    """Why ``name`` may not be used as a file name of a dataset, or None when it may.

    A file name must stay inside its split's folder whatever reads it (a local disk, a shared
    volume, an S3 bucket): a non-empty relative path of plain names, none of them ``..`` or
    ``.``, no absolute path, no backslash, no control character or NUL, not a URI.
    """
    if not isinstance(name, str) or not name:
        return "the file name is empty or not a string"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return "the file name holds a control character"
    if "\\" in name:
        return "the file name holds a backslash"
    if "://" in name:
        return "the file name is a URI, not a name inside the dataset"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "the file name is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "the file name leaves the dataset folder (an empty, '.' or '..' part)"
    return None
