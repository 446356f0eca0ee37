"""Files written whole: the task index (`distcomp export -o`) and the Ansible inventory
(`distcomp inventory cloudlab -o`). Both are read by other tools the moment they exist, so a
run that fails half-way (a full disk, a file size limit, Ctrl-C) must leave the file it was
replacing, not a cut one that parses as fewer tasks or fewer workers.

Stdlib only, like distcomp.cloudlab, which uses it where only the controller's python3 runs.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import TextIO


def one_line(text: str) -> str:
    """A message stays one line whatever a name in it holds (a file or worker name may contain
    a newline): line breaks show escaped, as Python writes them."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class OutputError(Exception):
    """``path`` cannot be written. ``usage``: refused before anything was written (a name
    that is no file: the caller's mistake, not the machine's)."""

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


@contextlib.contextmanager
def replaced_whole(path: str) -> Iterator[TextIO]:
    """A temporary file beside ``path``, renamed over it once the block has written it all.
    Through a symbolic link that is the file it names; anything else that is not a regular
    file (a FIFO, a device) is written directly, as renaming over it would put a regular file
    in its place."""
    if not path:
        raise OutputError("-o: the file name is empty", usage=True)  # both callers' option
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there: {exc.strerror}", usage=True) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: is a directory, expected a file name", usage=True)
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write there: {exc.strerror}",
                              usage=True) from None
        try:
            with open(fd, "w", encoding="utf-8", newline="") as direct:
                yield direct
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror}", usage=False) from None
        return
    import tempfile  # only here: 7% of every other command's start-up

    target = os.path.realpath(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                                   prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there: {exc.strerror}", usage=True) from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as out:
            yield out
        os.replace(tmp, target)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write: {exc.strerror}; the file was left as it "
                              f"was", usage=False) from None
        raise
