"""The one path-safety helper: every file name we write and every file we read goes through it.

Threats it closes (each has a test in ``tests/core`` and a row in ``docs/reliability.md``):

- **Names from files.** A checkpoint's ``provenance.json`` or index names the files an export
  writes. A name is accepted only as a plain file name (``check_name``) or a short relative
  path of plain names (``check_relpath``), and ``join_inside`` refuses a join whose existing
  parent resolves outside the root. So a tampered name cannot place a file outside the output
  (say a ``.pth`` in site-packages, which Python runs at start-up).
- **Special files.** ``open_regular`` opens with ``O_NONBLOCK`` and checks ``fstat`` before any
  read, so a FIFO named ``model.safetensors`` is refused instead of hanging the import, and a
  device or socket is refused too.
- **Symlinks.** A symlink is followed only if its target stays inside the source tree; the one
  exception is the Hugging Face hub cache, whose ``snapshots/<rev>/`` files link into the
  repository's ``blobs/``. A link to ``/etc/shadow`` in a downloaded folder is never copied into
  a checkpoint. Copies of our own trees (``copy_tree``) refuse links outright.
- **Output parents.** ``prepare_parent`` turns "parent is a file" and "permission denied" into
  errors that name the output, instead of ``FileExistsError: File exists``.

All errors are ``CheckpointError`` unless the caller passes another ``InputError`` class.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from longvila_jax.core.errors import CheckpointError, brief, brief_path, make_error

# A plain file name: starts with a letter or digit (no dotfiles, no "..", no "-flag"), then a
# conservative set; Hugging Face repos use nothing else for the files we copy or write.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+\-]*")
MAX_NAME = 200
MAX_REL_DEPTH = 4
_COPY_CHUNK = 4 << 20


def check_name(name: object, what: str, error: type[Exception] = CheckpointError) -> str:
    """Returns ``name`` if it is a plain file name (no separators, no ``..``, no dotfile).

    Raises:
      error: naming ``what`` and the (bounded) offending value.
    """
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME
        or not _NAME_RE.fullmatch(name)
        or ".." in name
    ):
        raise make_error(error, what, f"{brief(name)} is not a plain file name")
    return name


def check_relpath(
    rel: object, what: str, error: type[Exception] = CheckpointError, max_depth: int = MAX_REL_DEPTH
) -> str:
    """Returns ``rel`` if it is a relative POSIX path of at most ``max_depth`` plain names."""
    if not isinstance(rel, str) or not rel:
        raise make_error(error, what, f"{brief(rel)} is not a relative path")
    parts = rel.split("/")
    if len(parts) > max_depth:
        raise make_error(error, what, f"{brief(rel)} is nested deeper than {max_depth} levels")
    for part in parts:
        check_name(part, what, error)
    return rel


def check_member(
    rel: object, what: str, error: type[Exception] = CheckpointError, max_depth: int = 16
) -> str:
    """Returns ``rel`` if it names a file inside a tree: relative, no empty, ``.`` or ``..``
    parts, no NUL. Looser than ``check_relpath`` (Orbax names files ``_METADATA``), for lists
    of files we only read and compare, never create from."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or len(rel) > 1024:
        raise make_error(error, what, f"{brief(rel)} is not a relative path")
    parts = rel.split("/")
    if len(parts) > max_depth or any(p in ("", ".", "..") for p in parts):
        raise make_error(error, what, f"{brief(rel)} is not a plain relative path")
    return rel


def _checked_os_path(path: str | os.PathLike, what: str, error: type[Exception]) -> Path:
    """``path`` if the OS can take it: no NUL byte and encodable (a lone surrogate in a name
    read from JSON is not), else ``error`` instead of ``ValueError``/``UnicodeEncodeError``."""
    try:
        raw = os.fsencode(path)
    except (UnicodeEncodeError, TypeError):
        raise make_error(error, what, f"{brief_path(path)} is not a valid path") from None
    if b"\x00" in raw:
        raise make_error(error, what, f"{brief_path(path)} is not a valid path (NUL byte)")
    return Path(path)


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _hf_blobs(root_real: Path) -> Path | None:
    """``<repo>/blobs`` when ``root_real`` is a hub-cache ``<repo>/snapshots/<rev>`` folder."""
    if root_real.parent.name == "snapshots" and root_real.parent.parent.name.startswith(
        ("models--", "datasets--")
    ):
        return root_real.parent.parent / "blobs"
    return None


def target_allowed(path: Path, root: Path) -> bool:
    """Whether ``path`` (possibly through symlinks) resolves inside ``root`` or, for a hub-cache
    snapshot folder, inside the repository's ``blobs/``."""
    try:
        root_real = Path(os.path.realpath(root))
        real = Path(os.path.realpath(path))
    except (ValueError, OSError):  # a NUL byte, an unencodable name: not a path we follow
        return False
    if _within(real, root_real):
        return True
    blobs = _hf_blobs(root_real)
    return blobs is not None and _within(real, blobs)


def join_inside(
    root: str | os.PathLike, rel: object, what: str, error: type[Exception] = CheckpointError
) -> Path:
    """``root / rel`` after checking ``rel`` and that the existing part of the result does not
    resolve outside ``root`` (a symlinked sub-folder would redirect a write)."""
    root = Path(root)
    path = root / check_relpath(rel, what, error)
    probe = path
    while not probe.exists() and probe != root:
        probe = probe.parent
    if not _within(Path(os.path.realpath(probe)), Path(os.path.realpath(root))):
        raise make_error(error, what, f"{brief(rel)} resolves outside {brief_path(root)}")
    return path


def resolve_inside(
    root: str | os.PathLike, rel: object, what: str, error: type[Exception] = CheckpointError
) -> Path:
    """``root / rel`` for a file named by data we read (any file name, spaces included), refusing
    absolute paths, ``..`` that climbs out and links that lead out of ``root``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        raise make_error(error, what, f"{brief(rel)} is not a relative path")
    root_abs = Path(os.path.abspath(root))
    path = Path(os.path.normpath(root_abs / rel))
    if not _within(path, root_abs) or (path.exists() and not target_allowed(path, root_abs)):
        raise make_error(error, what, f"{brief(rel)} resolves outside {brief_path(root)}")
    return path


def open_regular(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = CheckpointError,
    *,
    root: str | os.PathLike | None = None,
) -> BinaryIO:
    """Opens ``path`` for binary reading only if it is a regular file.

    Opening never blocks (``O_NONBLOCK``, so a FIFO cannot hang us) and the type is checked on
    the open descriptor (no race with a swapped file). With ``root``, a path whose symlinks
    lead outside ``root`` is refused (hub-cache ``blobs/`` excepted, see ``target_allowed``).

    Raises:
      error: missing, not a regular file, unreadable, or a link out of ``root``.
    """
    path = _checked_os_path(path, what, error)
    if root is not None and not target_allowed(path, Path(root)):
        raise make_error(
            error,
            what,
            f"{brief_path(path)} is a symlink to a file outside {brief_path(root)}; "
            "refusing to read it",
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise make_error(error, what, f"{brief_path(path)} does not exist") from None
    except OSError as e:
        raise make_error(error, what, f"cannot open {brief_path(path)} ({e.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a directory"
                if stat.S_ISDIR(mode)
                else ("a device or socket")
            )
            raise make_error(error, what, f"{brief_path(path)} is {kind}, not a regular file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = CheckpointError,
    *,
    max_bytes: int | None = None,
    root: str | os.PathLike | None = None,
) -> bytes:
    """The bytes of regular file ``path`` (see ``open_regular``), refusing more than
    ``max_bytes`` without reading them."""
    with open_regular(path, what, error, root=root) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise make_error(
                error, what, f"{brief_path(path)} is {size} bytes, over the {max_bytes}-byte limit"
            )
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:  # e.g. /proc/self/mem: "regular" to fstat, unreadable
            raise make_error(
                error, what, f"cannot read {brief_path(path)} ({e.strerror})"
            ) from None
    if max_bytes is not None and len(data) > max_bytes:  # grew while we read it
        raise make_error(error, what, f"{brief_path(path)} is over the {max_bytes}-byte limit")
    return data


def is_regular(path: Path, root: Path) -> bool:
    """True for a regular file, or a symlink to one that stays inside ``root`` (no opening)."""
    try:
        st = path.lstat()
    except (OSError, ValueError):
        return False
    if stat.S_ISLNK(st.st_mode):
        if not target_allowed(path, root):
            return False
        try:
            st = path.stat()
        except OSError:
            return False
    return stat.S_ISREG(st.st_mode)


def check_folder(
    directory: str | os.PathLike,
    root: str | os.PathLike,
    what: str,
    error: type[Exception] = CheckpointError,
) -> None:
    """Refuses a folder that a third-party loader (a tokenizer) will read by itself when it
    holds a FIFO, device or socket, or a symlink out of ``root`` (hub-cache blobs excepted):
    the loader would hang, or read a host file.

    Raises:
      error: naming the entry.
    """
    directory, root = Path(directory), Path(root)
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        msg = f"cannot list {brief_path(directory)} ({e.strerror})"
        raise make_error(error, what, msg) from None
    for p in entries:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            if not target_allowed(p, root):
                msg = f"{brief_path(p)} is a symlink to a file outside {brief_path(root)}"
                raise make_error(error, what, f"{msg}; refusing to read it")
            try:
                st = p.stat()
            except OSError:
                continue  # dangling inside the tree: a loader that opens it gets an error
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            msg = f"{brief_path(p)} is not a regular file (a FIFO, device or socket)"
            raise make_error(error, what, msg)


def copy_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    what: str,
    error: type[Exception] = CheckpointError,
    *,
    root: str | os.PathLike | None = None,
) -> None:
    """Copies regular file ``src`` to the new file ``dst`` (never overwrites, never writes
    through a link at ``dst``); ``root`` bounds where ``src``'s symlinks may lead."""
    with open_regular(src, what, error, root=root) as fin:
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise make_error(
                error, what, f"cannot create {brief_path(dst)} ({e.strerror})"
            ) from None
        with os.fdopen(fd, "wb") as fout:
            while chunk := fin.read(_COPY_CHUNK):
                fout.write(chunk)


def copy_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    what: str,
    error: type[Exception] = CheckpointError,
) -> list[str]:
    """Copies a tree of directories and regular files; any link or special file is an error.

    Used for sub-trees of our own checkpoints (``hf/``, ``unused/``), which never hold links.

    Returns:
      The copied files as relative POSIX paths, sorted.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        rel = f"{what}/{entry.name}"
        st = entry.lstat()
        if stat.S_ISDIR(st.st_mode):
            sub = copy_tree(entry, dst / entry.name, rel, error)
            copied += [f"{entry.name}/{s}" for s in sub]
        elif stat.S_ISREG(st.st_mode):
            copy_file(entry, dst / entry.name, rel, error)
            copied.append(entry.name)
        else:
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a special file"
            raise make_error(
                error, rel, f"{brief_path(entry)} is {kind}; checkpoints hold regular files only"
            )
    return sorted(copied)


def prepare_parent(out: str | os.PathLike, what: str, error: type[Exception] = CheckpointError):
    """Creates ``out``'s parent directories, with errors that say what is wrong with ``out``."""
    parent = Path(out).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise make_error(
            error,
            what,
            f"cannot create {brief_path(out)}: {brief_path(parent)} (or a folder above it) "
            "is a file",
        ) from None
    except NotADirectoryError:
        raise make_error(
            error, what, f"cannot create {brief_path(out)}: a folder above it is a file"
        ) from None
    except OSError as e:
        raise make_error(error, what, f"cannot create {brief_path(out)} ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise make_error(
            error, what, f"cannot create {brief_path(out)}: {brief_path(parent)} is not writable"
        )


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a fsynced side file and ``os.replace``."""
    path = Path(path)
    side = path.with_name(f".{path.name}.partial")
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(side, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            side.unlink()
        raise


__all__ = [
    "MAX_NAME",
    "MAX_REL_DEPTH",
    "check_folder",
    "check_member",
    "check_name",
    "check_relpath",
    "copy_file",
    "copy_tree",
    "is_regular",
    "join_inside",
    "open_regular",
    "prepare_parent",
    "read_regular",
    "resolve_inside",
    "target_allowed",
    "write_atomic",
]
