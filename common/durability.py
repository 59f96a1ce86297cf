"""Helpers that make renames of files survive a power cut."""

import os
import pathlib

__all__ = ["fsync_folder"]


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush ``folder``'s entries to disk, so that a rename into it survives a power cut.

    ``os.replace`` changes only the folder's entries, and those reach the disk with an fsync of
    the folder itself, not of the file.
    """
    descriptor = os.open(pathlib.Path(folder), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
