"""One way to write a file that readers never see half-written.

Every file genunc writes for a user (exports, posteriors, checkpoints, reports) goes through
:func:`atomic_write`: the content lands in a temporary file in the same folder, is flushed to
disk, given the permissions a plain ``open(path, "w")`` would have had (the umask decides, so
colleagues on a shared machine can read the results), and only then renamed over ``path``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], content: bytes | str | Callable[[Path], object]) -> Path:
    """Write `content` (bytes, text, or a callable that writes the file it is given) to `path`.

    Readers see either the old file or the complete new one; on any failure the temporary file
    is removed and the old file is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        else:
            data = content.encode() if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
