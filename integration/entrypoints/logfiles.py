"""The engine's log files (``data_dir/logs/*.log``, written by `strokewatch run` and `demo`) kept to a size.

The API and worker processes write to their file through an inherited ``O_APPEND`` descriptor
(``processes._spawn``): it cannot be renamed under them, so a file beyond ``max_bytes`` is copied to
``NAME.1`` (older copies shifted up to ``NAME.<backups>``, the oldest dropped) and truncated in place; with
``O_APPEND`` the writers' next lines go to the new end. Lines written between the copy and the truncation are
lost, as with logrotate's ``copytruncate``: a few milliseconds once per rotation. Checked at every start and
by a scheduled job (``retention.log_check_s``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rotate_if_large(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` when it is larger than ``max_bytes``; True when it was rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for k in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{k}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{k + 1}"))
        first = path.with_name(f"{path.name}.1")
        fd = os.open(first, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # logs can hold identifiers: private
        with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.truncate(path, 0)
    return True


def rotate_logs(log_dir: Path, max_bytes: int, backups: int) -> list[str]:
    """Rotate every ``*.log`` in ``log_dir`` beyond ``max_bytes``; returns the names rotated."""
    if not log_dir.is_dir():
        return []
    return [p.name for p in sorted(log_dir.glob("*.log")) if rotate_if_large(p, max_bytes, backups)]
