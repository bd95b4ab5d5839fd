"""Writing files so that nothing is half-written: every file the package writes (checkpoints, dataset
shards and manifests, recordings' metadata, run state, results) goes through `atomic_path`, every
folder written as a whole (a training checkpoint, an export) through `atomic_folder`; and
`check_output_path`, run before long work so that its result has somewhere to go."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from worldmodel.errors import UserError, writing

TEMP_MARK = ".tmp-"  # in the name of every temporary file of an atomic write: ".<name>.tmp-<pid>-<hex>"


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_file(name: str) -> bool:
    """A temporary file of an atomic write (left behind if the writer was killed)."""
    return name.startswith(".") and TEMP_MARK in name


def _fsync_folder(folder: Path) -> None:
    try:  # makes the rename itself durable; some file systems cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike, sync: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write the whole file to. When the block ends without an error,
    the file is flushed to disk (`sync`; False for a small file rewritten often in a loop that must not
    wait on the disk, e.g. a recording's periodic metadata: the rename alone keeps it whole) and renamed
    over `path` (which so holds either its old content or all of the new); on an error it is removed. A
    full disk is a one-line DiskFullError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with writing(path):
            yield tmp
            if sync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _fsync_folder(path.parent)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `path` to write a whole folder in (a checkpoint, an export). When the
    block ends without an error it takes the place of `path` (an old one is moved aside, then removed),
    so a reader finds the old folder or the whole new one; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, sync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), sync)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def check_output_path(path: str | os.PathLike, what: str = "--out", folder: bool = False) -> Path:
    """`path`, if it can be written (a folder if `folder`, else a file), else a one-line UserError naming
    `what` and the path: run before the work, so that no result is lost at its end. Refused: a folder
    where a file goes or a file where a folder goes, a path under a file, and a place this process cannot
    write in (tried with a temporary file, which is removed: permissions, a read-only file system).
    Nothing is created."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{what} {p}: is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{what} {p}: is a folder; give a file name")
    base = p if folder else p.parent  # the nearest folder that exists: where the first write happens
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{what} {p}: {base} is a file, so nothing can be written under it")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".worldmodel-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} {p}: cannot write in {base} ({e.strerror})") from None
    if not folder and p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{what} {p}: the file is read-only")
    return p
