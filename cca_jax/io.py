"""Atomic outputs: a run that is interrupted never leaves a half-written result.

Everything is written into a hidden temporary sibling of the target; only when the writer
finishes without an exception is the temporary renamed onto the target (a directory with
`atomic_directory`, a single file with `atomic_file`).

What is left behind, precisely:

- an exception, Ctrl-C (SIGINT) or SIGTERM: nothing; the temporary is removed and an existing
  target is untouched (SIGTERM is turned into an exception while a write is under way, when
  the process left SIGTERM at its default action, which would end it without any cleanup);
- SIGKILL, a crash of the interpreter or a power cut: nothing can run, so the temporary
  `.NAME.tmp-PID@HOST.XXXXXXXX` stays (if the kill came while an existing target was being
  replaced, the previous target waits in `.NAME.old-PID@HOST.XXXXXXXX/previous`). The next
  `atomic_directory` for the same target removes the temporaries of processes of this host
  that no longer run, and puts a previous target back if the kill left none in its place.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(target: Path, kind: str) -> str:
    """`.NAME.tmp-PID@HOST.` (kind "tmp") or `.NAME.old-PID@HOST.`; mkdtemp appends 8
    random characters."""
    return f".{target.name}.{kind}-{os.getpid()}@{_host()}."


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


def stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """The temporaries of `target` left by processes of this host that no longer run."""
    target = Path(target).expanduser().absolute()
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)@(.+)\.[^.]+$")
    stale = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    for path in siblings:
        match = pattern.match(path.name)
        if (match and match.group(3) == _host() and int(match.group(2)) != os.getpid()
                and not _process_is_running(int(match.group(2)))):
            stale.append(path)
    return sorted(stale)


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `target` left (see the module docstring); a previous
    target moved aside by a writer killed halfway through replacing it comes back if the
    target is missing. Returns the paths removed or restored."""
    target = Path(target).expanduser().absolute()
    handled = []
    for path in stale_temporaries(target):
        previous = path / "previous"
        if ".old-" in path.name and previous.exists() and not os.path.lexists(target):
            os.replace(previous, target)
        shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


class Terminated(SystemExit):
    """SIGTERM while an atomic write was under way (exit status 128 + 15)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (so `finally` and `except` clauses clean
    up) if it would otherwise end the process at once: only in the main thread, and only
    while the handler is the default one (a program's own handler is left alone)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:   # unless the block set its own
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(out_dir: str | os.PathLike) -> None:
    """Raise before any work if `out_dir` could not be written: its nearest existing parent
    is not a directory, or no entry can be created there (read-only file system, missing
    permission). Tries by creating and removing an empty hidden directory, which is what
    counts (permission bits do not stop root; a read-only mount does)."""
    target = Path(out_dir).expanduser().absolute()
    base = _nearest_existing(target.parent)
    if not base.is_dir():
        raise NotADirectoryError(f"cannot create output directory {str(target)!r}: "
                                 f"{str(base)!r} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=base))
    except OSError as err:
        raise PermissionError(f"cannot write the output directory {str(target)!r}: "
                              f"{str(base)!r} is not writable ({err.strerror})") from None


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out_dir` when the block succeeds.

    Raises FileExistsError before anything is written if `out_dir` exists and `overwrite`
    is false. On any exception, Ctrl-C or SIGTERM the temporary directory is removed and
    `out_dir` is untouched; temporaries that killed writers of `out_dir` left are removed
    first (module docstring).
    """
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {str(target)!r} already exists; pass overwrite=True "
            "(--overwrite on the command line) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    with _sigterm_raises():
        tmp = old = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=target.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the result normal mode
            yield tmp
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "old"),
                                            dir=target.parent))
                os.replace(target, old / "previous")
                os.replace(tmp, target)
            else:
                os.replace(tmp, target)
            tmp = None
        except BaseException:
            if old is not None and (old / "previous").exists() and not target.exists():
                os.replace(old / "previous", target)   # interrupted between the renames
            raise
        finally:
            for leftover in (tmp, old):
                if leftover is not None:
                    shutil.rmtree(leftover, ignore_errors=True)


def default_file_mode() -> int:
    """The mode a newly created file gets under the current umask (0644 under umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def normalize_file_modes(directory: str | os.PathLike) -> None:
    """Give every file under `directory` the ordinary mode of a new file (writers that save
    through a private temporary file, e.g. safetensors' torch writer, leave 0600)."""
    mode = default_file_mode()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix, so writers that infer the format from it
    work) that replaces `path` when the block succeeds; removed on any exception, Ctrl-C or
    SIGTERM (after a SIGKILL the next write of `path` replaces it)."""
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    with _sigterm_raises():
        try:
            yield tmp
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
