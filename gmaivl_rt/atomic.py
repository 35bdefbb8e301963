"""Atomic file writes: write beside the target, fsync, then `os.replace`, so a reader (or a crash) never sees
half a file. Used for checkpoints, datasets and logs that must not be left torn."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


# The temporary name atomic_path writes to: '.<target name>.<8 random characters from mkstemp>.tmp'.
PARTIAL_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, exclusive: bool = False):
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed.
    A process killed in between leaves the temporary file (named as PARTIAL_FILE matches) behind.
    exclusive: never replace an existing `path` (FileExistsError instead), for writers racing to create one file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode of a new file
        if exclusive:
            os.link(tmp, path)  # atomic, and fails where another writer created `path` first
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_files(out_dir: str | Path, prefix: str = ".staging-"):
    """Yield a temporary folder inside `out_dir`; on success every file written there is moved into `out_dir`
    (each rename atomic), on error nothing lands. A folder written there replaces the one of that name already in
    `out_dir` whole (moved aside, the new one renamed in, the old one deleted), so nothing of an earlier run stays
    inside it. For writers that only take a folder (save_pretrained, exporters)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=prefix) as tmp:
        yield Path(tmp)
        for item in sorted(Path(tmp).iterdir()):
            target = out_dir / item.name
            if item.is_dir() and target.is_dir() and not target.is_symlink():
                old = Path(tempfile.mkdtemp(dir=out_dir, prefix=prefix + "old-"))
                os.replace(target, old / item.name)
                os.replace(item, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(item, target)


def remove_partial_files(folder: str | Path, recursive: bool = True) -> int:
    """Delete the temporary files `atomic_path` left in `folder` (and below when `recursive`) by a killed writer:
    only those whose name matches PARTIAL_FILE. Returns how many were removed."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        if not recursive:
            dirnames.clear()
        for name in filenames:
            if PARTIAL_FILE.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_create_bytes(path: str | Path, data: bytes) -> bool:
    """Write `data` to `path` atomically unless `path` exists; True only for the call that created it (so parallel
    writers of the same content-addressed file count it once)."""
    try:
        with atomic_path(path, exclusive=True) as tmp:
            Path(tmp).write_bytes(data)
    except FileExistsError:
        return False
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, indent: int | None = 2, **kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, **kwargs) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> None:
    """One JSON object per line, the whole file replaced at once."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoint and dataset digests)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
