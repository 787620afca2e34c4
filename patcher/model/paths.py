"""Where a command writes, checked before any work, and everything it writes committed together.

- :func:`check_outputs`: every path a command writes is compared with every path it reads,
  and with every other path it writes, by identity (``st_dev``/``st_ino`` of what the path
  names, so hard links, bind mounts, ``..`` and symlinks count), not by spelling.
- :func:`check_output_file` / :func:`check_output_folder`: the folder exists, is a folder
  (not under a file), and files can be created in it; the target is not a folder or a
  special file (FIFO, device, socket: refused even with ``--force``); an existing target,
  dangling symlinks included, needs ``--force`` where the flag has one.
- :func:`lock_output`: an advisory lock (``fcntl.flock``) on a lock file beside a target, so
  that a second run writing the same file refuses instead of replacing the first's output.
- :class:`Outputs`: files written in private folders beside their destinations, then
  renamed into place in one step; an exclusive target is created with ``link`` (fails if
  something appeared there meanwhile); a failed rename puts back what was there before
  (each replaced file is kept as a hard link until the step is done).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from patcher.errors import OutputError

#: Signals held back while outputs are renamed into place or cleaned up.
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

#: Targets committed in this process since :func:`forget_committed` (the CLI resets it per
#: verb): a signal held back during a commit arrives after it, when these are complete.
_COMMITTED: list[Path] = []


def committed() -> list[Path]:
    """The outputs placed whole by :meth:`Outputs.commit` since :func:`forget_committed`."""
    return list(_COMMITTED)


def forget_committed() -> None:
    _COMMITTED.clear()


def _identity(path: Path) -> tuple | None:
    """What ``path`` names: (device, inode) of the file it reaches, or for a path that does
    not exist (or a dangling symlink, which a write replaces) (device, inode) of its folder
    and its name; None when not even the folder exists."""
    try:
        info = os.stat(path)
        return ("file", info.st_dev, info.st_ino)
    except OSError:
        pass
    try:
        folder = os.stat(path.parent if str(path.parent) else Path("."))
    except OSError:
        return None
    return ("entry", folder.st_dev, folder.st_ino, path.name)


def _named(flag: str, path: Path) -> str:
    return f"{flag} ({path})" if flag != str(path) else str(path)


def check_outputs(reads: dict[str, Path | None], writes: dict[str, Path | None]) -> None:
    """Refuse (exit 2) when a path in ``writes`` is the same file as a path in ``reads``, or
    as another path in ``writes``. Keys name the flag (``"--json"``, ``"MODEL"``,
    ``"MODEL's data file"``); None values are skipped. Identity is by device and inode."""
    read_ids = [(flag, Path(p), _identity(Path(p))) for flag, p in reads.items() if p is not None]
    seen: list[tuple[str, Path, tuple]] = []
    for flag, path in writes.items():
        if path is None:
            continue
        path = Path(path)
        ident = _identity(path)
        if ident is None:
            continue  # its folder does not exist: check_output_file says so
        for rflag, rpath, rid in read_ids:
            if rid is not None and rid[0] == "file" and rid == ident:
                what = "its data file" if flag.endswith("data file") else "the output"
                raise OutputError(f"{_named(flag, path)} and {_named(rflag, rpath)} are the same "
                                  f"file: {what} would overwrite an input file; choose another "
                                  f"{flag.split(' ')[0].removesuffix(chr(39) + 's')}")
        for wflag, wpath, wid in seen:
            if wid == ident:
                raise OutputError(f"{_named(wflag, wpath)} and {_named(flag, path)} are the same "
                                  "file: two outputs cannot share a path; choose different ones")
        seen.append((flag, path, ident))


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _probe(target: Path, folder: Path) -> None:
    """Create and remove a private folder in ``folder``: fails where files cannot be made
    (read-only folder or file system, no permission)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".probe", dir=folder))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in '{folder}' ({exc.strerror or exc})") \
            from None


def _existing_ancestor(path: Path) -> tuple[Path, list[Path]]:
    """The nearest ancestor of ``path`` that exists, and the missing folders below it.
    Raises OSError for a name that could not be created (too long, a loop of symlinks)."""
    missing = []
    probe = path
    while True:
        try:
            os.lstat(probe)
            break
        except (FileNotFoundError, NotADirectoryError):  # the latter: under a file
            pass
        missing.append(probe)
        parent = _folder_of(probe)
        if parent == probe:
            break
        probe = parent
    return probe, missing[::-1]


def _refuse_special(flag: str, path: Path, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{_named(flag, path)}: is a folder; give a file name")
    if not stat.S_ISREG(info.st_mode):
        raise OutputError(f"{_named(flag, path)}: is not a regular file (a FIFO, device or "
                          "socket); refusing to write there, even with --force")


def check_output_file(flag: str, path: Path, force: bool | None = None) -> None:
    """Refuse (exit 2), before any work, a file output that cannot be written: a folder that
    does not exist or is a file, a folder where files cannot be created, a target that is a
    folder or a special file (even with ``--force``). With ``force`` given (the flag has a
    ``--force``), an existing target, dangling symlinks included, needs ``force=True``."""
    path = Path(path)
    try:
        _check_output_file(flag, path, force)
    except OSError as exc:  # a name too long, a loop of symlinks, no permission to look
        raise OutputError(f"{_named(flag, path)}: cannot write there ({exc.strerror or exc})") \
            from None


def _check_output_file(flag: str, path: Path, force: bool | None) -> None:
    folder = _folder_of(path)
    if not folder.is_dir():
        base, _ = _existing_ancestor(folder)
        if os.path.lexists(base) and not base.is_dir():
            raise OutputError(f"{_named(flag, path)}: '{base}' is a file, not a folder")
        raise OutputError(f"{path}: folder '{folder}' does not exist")
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    if link is not None:
        if stat.S_ISLNK(link.st_mode):
            try:
                _refuse_special(flag, path, os.stat(path))
            except OSError:  # dangling: a write would replace the link
                if force is not None and not force:
                    raise OutputError(f"{path} exists (a symlink to a missing file); pass "
                                      "--force to replace it") from None
        else:
            _refuse_special(flag, path, link)
        if force is not None and not force:
            raise OutputError(f"{path} exists; pass --force to overwrite it")
    _probe(path, folder)


def check_output_folder(flag: str, folder: Path) -> None:
    """Refuse (exit 2), before any work, an output folder that is a file, lies under a file,
    or cannot be created or written to (a missing folder is created at the end)."""
    folder = Path(folder)
    try:
        base, missing = _existing_ancestor(folder)
        if not base.is_dir():
            what = "is a file" if not missing else f"is under '{base}', which is a file"
            raise OutputError(f"{_named(flag, folder)}: {what}, not a folder")
    except OSError as exc:
        raise OutputError(f"{_named(flag, folder)}: cannot write there "
                          f"({exc.strerror or exc})") from None
    _probe(folder, base)


def check_folder_outputs(flag: str, folder: Path, reads: dict[str, Path | None],
                         writes_name: Callable[[str], bool]) -> None:
    """Refuse (exit 2) when a file this command reads sits directly in the output ``folder``
    (compared by identity: the folder's device and inode) under a name the command writes
    there (``writes_name(name)``)."""
    try:
        info = os.stat(folder)
    except OSError:
        return  # a folder that does not exist yet holds no input
    for rflag, rpath in reads.items():
        if rpath is None:
            continue
        rpath = Path(rpath)
        try:
            parent = os.stat(_folder_of(rpath))
        except OSError:
            continue
        if (parent.st_dev, parent.st_ino) == (info.st_dev, info.st_ino) and writes_name(rpath.name):
            raise OutputError(f"{_named(flag, Path(folder))} holds {_named(rflag, rpath)}, which "
                              f"the output would overwrite ({rpath.name}); choose another {flag}")


# ---------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def lock_output(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for writing ``path`` (a ``.NAME.lock`` file beside it,
    removed on release; a lock left by a killed run is free again, flock locks die with
    their process). A second holder is refused at once (exit 2)."""
    import fcntl

    path = Path(path)
    lock = _folder_of(path) / f".{path.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file {lock.name} "
                              f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: another onnx-rectify run is writing it (lock "
                                  f"{lock.name} is held); wait for it or choose another "
                                  "output") from None
            raise OutputError(f"{path}: cannot lock {lock.name} ({exc.strerror})") from None
        # the holder before us may have removed the file after we opened it: lock anew
        try:
            same = os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with held_signals():
            try:
                os.unlink(lock)
            except OSError:
                pass
            os.close(fd)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP (delivered afterwards) while the block runs.

    In the main thread the signals' Python handlers are swapped for one that records them,
    and the recorded ones are raised again, once, after the old handlers are back. (A
    thread mask is not enough: the kernel hands a process signal to any thread that does
    not block it - torch's workers, a progress thread - and Python then runs the handler
    in the main thread wherever it is.) Elsewhere the calling thread's mask is used."""
    pending: list[int] = []
    old: dict[int, object] = {}
    mask = None
    try:
        for signum in sorted(_HELD_SIGNALS):
            old[signum] = signal.signal(signum, lambda s, _frame: pending.append(s))
    except ValueError:  # not the main thread: Python handlers cannot be set here
        for signum, handler in old.items():
            signal.signal(signum, handler)
        old = {}
        try:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        except (AttributeError, ValueError, OSError):
            mask = None
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


# --------------------------------------------------------------------------- the commit
def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (ordinary permissions)."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class _Item:
    staged: Path
    final: Path
    exclusive: bool
    backup: Path | None = None
    placed: bool = False


@dataclass
class Outputs:
    """Files staged in private folders beside their destinations, renamed into place
    together by :meth:`commit`; :meth:`discard` (always call it, e.g. in ``finally``, or use
    the object as a context manager) removes every staged file and private folder."""

    items: list[_Item] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # private folders to remove
    trees: list[tuple[Path, Path]] = field(default_factory=list)  # (staged folder, final)
    made: list[Path] = field(default_factory=list)  # folders created by commit

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def private_folder(self, folder: Path, name: str) -> Path:
        """A new private folder in ``folder`` (removed by :meth:`discard`)."""
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder))
        except OSError as exc:
            raise OutputError(f"{folder / name}: cannot write in '{folder}' "
                              f"({exc.strerror or exc})") from None
        self.folders.append(stage)
        return stage

    def add(self, staged: Path, final: Path, exclusive: bool = False) -> None:
        """Commit the already written ``staged`` file (in ``final``'s folder's file system)
        to ``final``; ``exclusive``: refuse if ``final`` exists by then."""
        self.items.append(_Item(Path(staged), Path(final), exclusive))

    def add_bytes(self, final: Path, data: bytes, exclusive: bool = False) -> Path:
        """Write ``data`` now into a private folder beside ``final`` (fsynced); renamed to
        ``final`` by :meth:`commit`. Returns the staged file."""
        final = Path(final)
        stage = self.private_folder(_folder_of(final), final.name)
        try:
            write_synced(stage / final.name, data)
        except OSError as exc:
            raise OutputError(f"{final}: write failed ({exc.strerror or exc})") from None
        self.add(stage / final.name, final, exclusive)
        return stage / final.name

    def add_text(self, final: Path, text: str, exclusive: bool = False) -> Path:
        """:meth:`add_bytes` of ``text`` in UTF-8."""
        return self.add_bytes(final, text.encode("utf-8"), exclusive)

    def tree(self, final: Path) -> Path:
        """A private folder to write the files of output folder ``final`` into: the
        files are moved into ``final`` by :meth:`commit` (which creates it if needed)."""
        final = Path(final)
        if final.is_dir():
            stage = self.private_folder(final, "files")
        else:
            base, _ = _existing_ancestor(final)
            stage = self.private_folder(base, final.name)
        self.trees.append((stage, final))
        return stage

    def _plan_trees(self) -> None:
        for stage, final in self.trees:
            for name in sorted(os.listdir(stage)):
                if os.path.isfile(stage / name):
                    self.add(stage / name, final / name)
        self.trees = []

    def commit(self) -> list[Path]:
        """Rename every staged file into place, signals held back; on any failure put back
        what each target held before and raise :class:`OutputError`. Returns the targets."""
        with held_signals():
            for stage, final in self.trees:  # folders of the report: create them now
                try:
                    for folder in _existing_ancestor(final)[1]:
                        os.mkdir(folder)
                        self.made.append(folder)
                except OSError as exc:
                    self._rollback()
                    raise OutputError(f"{final}: cannot create the folder "
                                      f"({exc.strerror or exc})") from None
            self._plan_trees()
            for item in self.items:
                if item.exclusive and os.path.lexists(item.final):
                    self._rollback()
                    raise OutputError(f"{item.final} exists (written by another run meanwhile?); "
                                      "pass --force to overwrite it")
            try:
                for item in self.items:
                    self._place(item)
            except OSError as exc:
                failed = item
                self._rollback()
                if exc.errno == errno.EEXIST:
                    raise OutputError(f"{failed.final} exists (written by another run "
                                      "meanwhile?); pass --force to overwrite it") from None
                raise OutputError(f"{failed.final}: cannot move the written file into place "
                                  f"({exc.strerror or exc}); earlier files there are as they "
                                  "were") from None
            for folder in dict.fromkeys(_folder_of(i.final) for i in self.items):
                fsync_folder(folder)
            for item in self.items:
                if item.backup is not None:
                    _unlink(item.backup)
            _COMMITTED.extend(item.final for item in self.items)
            return [item.final for item in self.items]

    def _place(self, item: _Item) -> None:
        if os.path.lexists(item.final) and not item.exclusive:
            backup = item.staged.with_name(f".{item.final.name}.before")
            try:
                os.link(item.final, backup, follow_symlinks=False)
                item.backup = backup
            except OSError:  # no hard links here: keep it by renaming (restored on failure)
                os.rename(item.final, backup)
                item.backup = backup
        if item.exclusive:
            os.link(item.staged, item.final)  # EEXIST if anything appeared there
            item.placed = True
            _unlink(item.staged)
        else:
            os.replace(item.staged, item.final)
            item.placed = True

    def _rollback(self) -> None:
        for item in reversed(self.items):
            if item.backup is not None and os.path.lexists(item.backup):
                try:
                    os.replace(item.backup, item.final)
                    item.backup = None
                    continue
                except OSError:
                    pass
            if item.placed:
                _unlink(item.final)
        for folder in reversed(self.made):
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def discard(self) -> None:
        """Remove every private folder (and what is left in it)."""
        with held_signals():
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)
            self.folders = []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
