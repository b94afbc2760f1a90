"""Writing secret or critical files: created with their final mode, synced, and
replaced in one step so a reader never sees half a file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_new_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from the start, and sync it.

    Raises:
        FileExistsError: ``path`` exists.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` beside ``path`` with ``mode``, then move it over ``path`` in one step."""
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        write_new_file(staging, data, mode)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort where directories can't sync."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
