"""What an image file holds, told by its first bytes rather than its name.

A file named ``.nii.gz`` that is not gzipped, a gzipped NIfTI named ``.nii``, a NIfTI or a
MetaImage under the other's name: nibabel and ITK pick a reader by the name and fail with an
unhelpful message. :func:`sniff` reads the magic bytes; :func:`content_alias` gives a
temporary link with the suffix that matches the content, so the ordinary readers read it.

Recognised (:data:`SUFFIXES`): ``nifti`` (NIfTI-1 or -2, single file, ``n+1`` / ``n+2`` magic),
``nifti-gz`` (the same gzipped), ``metaimage`` (``.mha`` with its data in the same file),
``nrrd`` (attached data), ``dicom`` (``DICM`` at byte 128). Detached headers (``.mhd``,
``.nhdr``) name their data file relative to their own folder and are left to their suffix.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

#: content kind -> the suffix a reader needs
SUFFIXES = {"nifti": ".nii", "nifti-gz": ".nii.gz", "metaimage": ".mha", "nrrd": ".nrrd"}


#: how a kind reads in a message
DESCRIPTIONS = {
    "nifti": "an uncompressed NIfTI",
    "nifti-gz": "a gzipped NIfTI",
    "metaimage": "a MetaImage (.mha)",
    "nrrd": "an NRRD",
    "dicom": "a single DICOM file",
}


def _nifti(head: bytes) -> bool:
    if len(head) >= 348 and head[344:347] in (b"n+1",):
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if len(head) >= 12 and head[4:7] == b"n+2":
        return int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    return False


def _text_header(head: bytes) -> str:
    """The bytes as text (latin-1: every byte decodes; binary data after a header is harmless)."""
    return head.decode("latin-1")


def sniff(path: str | os.PathLike) -> str | None:
    """The kind of image a file holds by its content: a key of :data:`SUFFIXES`, ``"dicom"``, or
    None (unknown, unreadable, or a detached header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        try:
            inner = _gunzip_head(path)
        except (zlib.error, OSError, EOFError):
            return None
        return "nifti-gz" if _nifti(inner) else None
    if _nifti(head):
        return "nifti"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    text = _text_header(head)
    if text.startswith("NRRD000"):
        return None if re.search(r"^data ?file:", text, re.MULTILINE | re.IGNORECASE) else "nrrd"
    if re.match(r"^\s*(ObjectType|NDims)\s*=", text):
        found = re.search(r"^\s*ElementDataFile\s*=\s*(\S+)", text, re.MULTILINE)
        return "metaimage" if found and found.group(1).upper() == "LOCAL" else None
    return None


def _gunzip_head(path: str | os.PathLike, size: int = 352) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read(size)


#: name suffix -> the kind it claims (detached headers claim their format too)
_NAMED = {".nii.gz": "nifti-gz", ".nii": "nifti", ".mha": "metaimage", ".mhd": "metaimage", ".nrrd": "nrrd", ".nhdr": "nrrd", ".dcm": "dicom"}


def by_name(path: str | os.PathLike) -> str | None:
    """The kind a file's name claims (``.nii`` -> ``nifti``, ``.nii.gz`` -> ``nifti-gz``, ``.mha``
    / ``.mhd`` -> ``metaimage``, ``.nrrd`` / ``.nhdr`` -> ``nrrd``, ``.dcm`` -> ``dicom``), or None."""
    name = Path(path).name.lower()
    for suffix, kind in _NAMED.items():  # longest suffix first
        if name.endswith(suffix):
            return kind
    return None


def mismatch(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(content kind, warning)`` when a file's content is a known image kind other than the one
    its name claims, else None."""
    named, actual = by_name(path), sniff(path)
    if actual is None or actual == named:
        return None
    name = Path(path).name.lower()
    claimed = next((f"named {suffix}" for suffix in _NAMED if name.endswith(suffix)), "without an image suffix")
    return actual, f"{claimed} but holds {DESCRIPTIONS[actual]}: read by its content"


@contextlib.contextmanager
def content_alias(path: str | os.PathLike, kind: str) -> Iterator[Path]:
    """A temporary name for ``path`` with the suffix of ``kind`` (a symbolic link, or a copy where
    links cannot be made), removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="stmt-alias-"))
    alias = folder / f"image{SUFFIXES[kind]}"
    try:
        try:
            os.symlink(Path(path).resolve(), alias)
        except OSError:
            shutil.copyfile(path, alias)
        yield alias
    finally:
        shutil.rmtree(folder, ignore_errors=True)
