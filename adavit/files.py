"""Files written whole: into a temporary file in the same folder, then swapped in by an atomic rename, so that a crash
or a kill in the middle of a write leaves the previous file as it was. For results, logs, configs and (durably, synced
to disk) checkpoints."""
import json
import os
from typing import IO, Any, Callable, Optional


def write_atomic(
        path: str,
        write: Callable[[IO], None],
        newline: Optional[str] = None,
        binary: bool = False,
        durable: bool = False,
) -> None:
    """Let ``write`` fill a file that becomes ``path`` only once complete; makes ``path``'s folder.

    Args:
        path: Where the file ends up.
        write: Fills the open temporary file.
        newline: As ``open`` takes it (text files).
        binary: Open the file in binary mode.
        durable: Sync the file's bytes and then the rename to disk before returning (checkpoints): without it, a power
            loss soon after may leave an empty file under ``path`` on some file systems.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'wb' if binary else 'w', newline=None if binary else newline) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        try:  # the rename itself
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written whole (``write_atomic``)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2))
