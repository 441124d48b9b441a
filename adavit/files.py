"""Files written whole: into a temporary file in the same folder, then swapped in by an atomic rename, so that a crash
or a kill in the middle of a write leaves the previous file as it was. For results, logs and configs; checkpoints also
sync to disk (``training/checkpoint.py``)."""
import json
import os
from typing import IO, Any, Callable, Optional


def write_atomic(path: str, write: Callable[[IO], None], newline: Optional[str] = None) -> None:
    """Let ``write`` fill a text file that becomes ``path`` only once complete; makes ``path``'s folder."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
    try:
        with open(tmp, 'w', newline=newline) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written whole (``write_atomic``)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=2))
