"""Small helpers shared by every stage: atomic writes, run locks, JSON."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputDirError

logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are 0600 whatever the umask, so a run's model, metrics and
    # labels could be read by their owner alone (a shared /shared/runs, a Space's files).
    while True:
        tmp = str(path.parent / temp_name(path.name))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        break
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        # A writer that makes the file anew gives it its own mode (safetensors' save_file: 0600).
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give files the mode a file made here gets (0666 less the umask), as `atomic_write` gives
    its own: safetensors' save_file (behind `save_pretrained` and the checkpoints) makes its
    files 0600 whatever the umask, so a run's weights were readable by their owner alone on a
    shared disk or a Space's files. The mode is read from a probe file rather than from
    os.umask, whose read is a write that other threads could see."""
    if not paths:
        return
    folder = Path(paths[0]).parent
    probe = folder / temp_name("mode")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)
    for path in paths:
        if stat.S_IMODE(os.stat(path).st_mode) != mode:
            os.chmod(path, mode)


def temp_name(name: str) -> str:
    """The hidden name `atomic_write` writes `name` under before renaming it into place. It
    holds the writer's pid@host, so that a file left by a writer that was killed mid-write
    (SIGKILL, a power cut) is told from one being written: `remove_dead_temp_files`."""
    return f".{name}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}.tmp"


_TEMP_FILE = re.compile(r"\..+\.(\d+)@(.+)\.[0-9a-f]{8}\.tmp")


def remove_dead_temp_files(folder: str | os.PathLike) -> None:
    """Delete the temp files in `folder` (`temp_name`) whose writers were killed before they
    renamed them into place; those of live writers, and of other machines, whose writers cannot
    be told alive from here, are left. Files left by versions that did not name the writer are
    left too: their writers cannot be told dead."""
    host = socket.gethostname()
    try:
        names = [entry.name for entry in os.scandir(folder) if entry.name.endswith(".tmp")]
    except OSError:  # not there yet, or not readable: nothing to tidy
        return
    for name in names:
        match = _TEMP_FILE.fullmatch(name)
        if match and match.group(2) == host and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """`fig.savefig(path, **kwargs)` written atomically: a run stopped (or out of disk) while
    it draws leaves the plot that was there, never a cut-off image."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Flush every file in `folder`, then the folder itself, to the disk (before it is renamed
    into place: a power cut must not leave a complete-looking folder of empty files)."""
    folder = Path(folder)
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                try:
                    os.fsync(f.fileno())
                except OSError:
                    pass  # Windows flushes only files opened for writing; its renames are journalled
    fsync_directory(folder)


def fsync_directory(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to the disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk (or the quota) is full: an OSError, or safetensors' own
    error, which carries the OS error only in its message ("... (os error 28)")."""
    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if isinstance(err, OSError) and err.errno in codes:
        return True
    text = str(err)
    return "No space left on device" in text or any(f"(os error {code})" in text for code in codes)


# Test hook, tiny on purpose: SBERT_SAE_TEST_PAUSE="POINT:N:FLAG_FILE" makes the process write
# FLAG_FILE (its pid) and wait when it reaches POINT for the N-th time ("step" N of training,
# the "checkpoint" of step N half-written, labelling "block" N saved, its "labels" written),
# so that tests/test_reliability.py can SIGKILL a real run exactly there, or let it go on by
# deleting FLAG_FILE (an hour at most). Unset, it is one lookup.
TEST_PAUSE_ENV = "SBERT_SAE_TEST_PAUSE"


def pause_point(point: str, n: int) -> None:
    spec = os.environ.get(TEST_PAUSE_ENV)
    if not spec:
        return
    want, count, flag = spec.split(":", 2)
    if want == point and int(count) == n:
        Path(flag).write_text(str(os.getpid()))
        deadline = time.monotonic() + 3600
        while os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)


def _json_default(value: Any):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def usable_cores(at_most: int = 8) -> int:
    """CPU cores this process may run on (its affinity where the OS tells it), at most `at_most`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(at_most, cores))


def dumps_json(data: Any, depth: int = 3) -> str:
    """`data` as JSON text (NaN/inf become null: JSON has neither), indented down to `depth`
    levels of nesting, each value below that on one line, as is a list of plain values.

    json's own indented output runs in pure Python, 20x slower than its compact encoder in C:
    a labels file of 6,144 features took 2.5 s to write, and labelling saves its work after
    every block. Here only the shallow levels are walked in Python, and each deeper value
    (one feature's keywords, a list of numbers) is written by the C encoder."""
    return _dumps(data, depth, 0)


def _dumps(value: Any, depth: int, level: int) -> str:
    if level < depth and isinstance(value, (dict, list, tuple)) and len(value) and (isinstance(value, dict) or any(isinstance(v, (dict, list, tuple)) for v in value)):
        pad, inner = "  " * level, "  " * (level + 1)
        if isinstance(value, dict):
            # Each key as json writes it (an int key becomes "1"): the text between "{" and ": null}".
            items = [f"{inner}{_compact({key: None})[1:-7]}: {_dumps(item, depth, level + 1)}" for key, item in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        return "[\n" + ",\n".join(f"{inner}{_dumps(item, depth, level + 1)}" for item in value) + f"\n{pad}]"
    return _compact(value)


def _compact(value: Any) -> str:
    try:
        return json.dumps(value, separators=(", ", ": "), allow_nan=False, default=_json_default)
    except ValueError:  # a NaN or an infinity somewhere: walk the value to null them
        return json.dumps(_finite(value), separators=(", ", ": "), default=_json_default)


def write_json(path: str | os.PathLike, data: Any, depth: int = 3) -> None:
    """Write `data` as JSON atomically (`dumps_json`)."""
    text = dumps_json(data, depth) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_finite(record), default=_json_default) + "\n")


class PathLock:
    """An exclusive OS lock on the file `path`, freed with the process that holds it however it
    dies (flock on POSIX; on Windows filelock's msvcrt lock), whose file its holder deletes as it
    lets go: a lock file lies there only while it is held, or after its holder was killed
    (`prune_locks` deletes those).

    Deleting a lock file is safe because a taker checks, once the OS has given it the lock,
    that `path` still names the file it locked. A process that opened the file before its
    holder deleted it is given the lock on the deleted file as the holder lets go, while a third
    may have made the file anew and locked that: without the check both would hold the lock,
    on two files. With it the first finds the name gone, or another file there, and starts
    again on what `path` names now. (Windows refuses to delete a file another process has open,
    and filelock deletes its own there.)"""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._filelock = None  # on Windows, or a disk without flock

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting at most `timeout` seconds (None: as long as it takes, 0: not
        at all) while another process holds it: True once held, False when not got in time.
        Raises OSError when the lock file cannot be made or locked."""
        if os.name == "nt":
            return self._acquire_by_filelock(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            fd, created = self._open()
            try:
                got = self._lock(fd, wait=deadline is None)
                if got and _names_file(self.path, fd):
                    self._fd = fd
                    return True
            except BaseException as err:
                os.close(fd)
                if isinstance(err, OSError) and err.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                    # A disk without flock (some FUSE mounts, Lustre without -o flock): a lock
                    # that is a file existing while it is held (filelock's SoftFileLock, which
                    # filelock itself falls back to there, from 3.12 on; 3.8 raised).
                    if created:
                        self.path.unlink(missing_ok=True)
                    warnings.warn(
                        f"flock not supported on this filesystem ({self.path.parent}): {self.path.name} is a lock file that exists while it is held; "
                        "one left by a process that was killed must be deleted by hand",
                        stacklevel=2,
                    )
                    return self._acquire_by_filelock(timeout, soft=True)
                raise
            os.close(fd)
            if got:
                continue  # deleted while this one waited on it: locked again as the name is now
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _acquire_by_filelock(self, timeout: float | None, soft: bool = False) -> bool:
        from filelock import FileLock, SoftFileLock, Timeout

        lock = (SoftFileLock if soft else FileLock)(self.path)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            return False
        self._filelock = lock
        return True

    def _open(self) -> tuple[int, bool]:
        """The lock file opened, made if missing; whether this call made it."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True  # the umask applies
        except FileExistsError:
            pass
        except OSError as err:  # a read-only disk may say so before it says the file exists
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not self.path.exists():
                raise
        try:
            return os.open(self.path, os.O_RDWR), False
        except FileNotFoundError:
            return self._open()  # deleted since: made anew
        except OSError as err:
            # Another user's lock file in a shared cache, a read-only disk: flock needs no write access.
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return os.open(self.path, os.O_RDONLY), False

    @staticmethod
    def _lock(fd: int, wait: bool) -> bool:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if not wait and err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        return True

    def release(self) -> None:
        if self._filelock is not None:
            self._filelock.release()
            self._filelock = None
            return
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Deleted while still held; see the class docstring for why that is safe.
            with contextlib.suppress(OSError):
                self.path.unlink()
        finally:
            os.close(fd)  # frees the lock


def _names_file(path: Path, fd: int) -> bool:
    """Whether `path` names the open file `fd` (not deleted, nor made anew)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return os.path.samestat(st, os.fstat(fd))


def prune_locks(folder: str | os.PathLike, pattern: str = "*.lock") -> None:
    """Delete the lock files in `folder` no process holds (left by killed processes, or by
    versions that kept their lock files), each taken first, never waited for."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(pattern):
        lock = PathLock(path)
        try:
            if lock.acquire(timeout=0):
                lock.release()
        except OSError:  # another user's, a read-only disk: left
            pass


# How old an empty run lock must be to be taken for a dead run's. Runs write their lock whole
# (`_create_lock`); an empty one was left by an older version killed between making its lock
# file and writing its pid into it, or is one such version's that is starting right now.
EMPTY_LOCK_STALE_S = 30


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder/.lock` for the duration of a run; a second run into the folder is refused."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{folder} is a file, not a folder: give a folder for the results") from None
    except OSError as err:  # read-only, not allowed, a file where a parent folder should be
        raise OutputDirError(f"cannot make the folder {folder}: {err.strerror}") from err
    lock = folder / ".lock"
    try:
        for _ in range(3):
            if _create_lock(lock):
                break
            owner = _lock_owner(lock)
            if owner is None:
                continue  # released since: created anew
            pid, _, host = owner.partition("@")
            if not pid.isdigit():
                # Empty (an older version's run killed as it started), or not a run's at all:
                # bytes a crash left in it (zeros after a power cut), a hand-made file.
                what = "is empty" if owner == "" else f"holds no run's pid ({clip(owner, 40)!r})"
                age = _age(lock)
                if age is None:
                    continue  # released since
                if age < EMPTY_LOCK_STALE_S:
                    raise OutputDirError(
                        f"{folder} is in use by a run that is starting, or was by one killed as it started: its lock file {lock} {what}; "
                        f"such a lock is taken for a dead run's once {EMPTY_LOCK_STALE_S} s old: run again then, or delete {lock} if no run is starting there"
                    )
                logger.warning("%s: taking over the lock file %s, which %s, left %.0f s ago", folder, lock, what, age)
                pause_point("stale-lock", 1)
                if _take_over(lock, owner):
                    break
                continue  # another run replaced it first: whose it is now is read again
            # Whether a process lives can be told only on its own machine: on a folder shared
            # by several machines, a live run elsewhere has a pid that is free here.
            if pid.isdigit() and host in ("", socket.gethostname()) and not _pid_alive(int(pid)):
                pause_point("stale-lock", 1)
                if _take_over(lock, owner):  # left by a run that was killed
                    # Said, as a lock without a pid is: the run that was killed left its folder
                    # part-written (a checkpoint to resume from, or a half-made one removed).
                    logger.warning("%s: taking over the lock file %s of pid %s, a run of this machine that is no longer running (killed)", folder, lock, pid)
                    break
                continue  # another run replaced it first: whose it is now is read again
            if host and host != socket.gethostname():
                raise OutputDirError(
                    f"{folder} is in use by another run (pid {pid} on {host}; lock file {lock}); "
                    f"if no run is writing there any more, delete {lock}"
                )
            raise OutputDirError(f"{folder} is in use by another run (pid {pid or '?'}; lock file {lock})")
        else:
            raise OutputDirError(f"cannot take the lock {lock}")
    except OSError as err:  # a read-only disk, a folder of another user
        if isinstance(err, OutputDirError):
            raise
        raise OutputDirError(f"cannot write into {folder}: {err.strerror}") from err
    # What runs killed as they took the lock may have left beside it: a takeover's guard, the
    # file a lock was being made from.
    with contextlib.suppress(OSError):
        prune_locks(folder, f"{lock.name}.takeover")
        _remove_dead_lock_files(lock)
    # And what runs killed as they wrote a file there left: its temp file, as large as the file.
    remove_dead_temp_files(folder)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _create_lock(lock: Path) -> bool:
    """Create `lock` holding this process' pid@host; False when it exists (or a file it was
    being made from was deleted meanwhile: tried again). The pid is written into a file of its
    own, which is then linked to the lock's name: a lock is never seen empty, even when its run
    is killed as it makes it, and a run killed before the link leaves no lock."""
    owner = f"{os.getpid()}@{socket.gethostname()}"
    tmp = lock.with_name(f"{lock.name}.{owner}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        try:
            os.write(fd, owner.encode())
        finally:
            os.close(fd)
        pause_point("lock-create", 1)
        try:
            os.link(tmp, lock)
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError:  # a disk without hard links (FAT, some network shares): made in place
            return _create_lock_in_place(lock, owner)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _create_lock_in_place(lock: Path, owner: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, owner.encode())
    finally:
        os.close(fd)
    return True


def _remove_dead_lock_files(lock: Path) -> None:
    """Delete the files `_create_lock` makes a lock from (`<lock>.<pid@host>.<hex>.tmp`) that
    runs of this machine killed as they took the lock left behind; those of live runs, and of
    other machines, whose runs cannot be told alive from here, are left."""
    prefix, host = f"{lock.name}.", socket.gethostname()
    for path in lock.parent.glob(f"{glob.escape(lock.name)}.*.tmp"):
        pid, _, rest = path.name[len(prefix) : -len(".tmp")].partition("@")
        if pid.isdigit() and rest.rpartition(".")[0] == host and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> str | None:
    """What `lock` holds (pid@host), None when there is no such file (released since it was found)."""
    try:
        return lock.read_text().strip()
    except FileNotFoundError:
        return None


def _age(path: Path) -> float | None:
    """Seconds since `path` was last written; None when it is gone."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _take_over(lock: Path, stale: str) -> bool:
    """Replace `lock`, found holding `stale` (a dead run's pid, or nothing), by this process'
    own: True if done, False if another run replaced or removed it first.

    Several runs can find one stale lock at once. Each deleting it and creating its own, one
    would delete the lock another had just made, and both would write the folder. The check
    and the replacement are therefore made under a second lock beside it, `<lock>.takeover`
    (a `PathLock`: freed with the process that holds it, and deleted as it is let go): the
    lock file is read again there, and only the run that still finds `stale` in it replaces it."""
    guard = PathLock(str(lock) + ".takeover")
    # Held for a read, a delete and a write; the timeout turns a guard that cannot be made
    # (filelock retries some errors, on Windows) into a refusal rather than a hang.
    if not guard.acquire(timeout=60):
        raise OutputDirError(f"cannot take over the stale lock {lock}: its guard {guard.path} stayed locked for 60 s")
    try:
        if _lock_owner(lock) != stale:
            return False
        lock.unlink()
        return _create_lock(lock)
    finally:
        guard.release()


def weights_stamp(folder: str | os.PathLike) -> tuple | None:
    """Identifies the `model.safetensors` in a run folder as it is now: a run that replaces it
    (train --overwrite) renames a new file in, with another inode."""
    try:
        st = os.stat(Path(folder) / "model.safetensors")
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def check_weights_unchanged(folder: str | os.PathLike, stamp: tuple | None, work: str) -> None:
    """Refuse to write `work` made from the SAE loaded when `stamp` was taken, if another run
    has replaced that SAE since (a run folder is locked only while it is written to)."""
    if weights_stamp(folder) != stamp:
        raise OutputDirError(f"the SAE in {folder} was replaced by another run while its {work} were being made from it: nothing written; run again")


def _pid_alive(pid: int) -> bool:
    import psutil

    # Not os.kill(pid, 0): on Windows that terminates the process rather than probing it.
    return psutil.pid_exists(pid)


def clip(text: str, keep: int) -> str:
    """`text`, or its first `keep` characters and an ellipsis when it is longer."""
    return text if len(text) <= keep else text[:keep] + "…"


def markdown_cell(value) -> str:
    """`value` as the text of one cell of a Markdown table: a "|" in it (a domain "database|sql",
    a label) would end the cell and shift the row's columns, and a line break would end the row."""
    return re.sub(r"[\r\n]+", " ", str(value)).replace("|", "\\|")


def slugify(value: str) -> str:
    """A folder-safe name for a domain value ("Biology & health sciences" -> "biology-health-sciences")."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", value).strip("-").lower()
    return slug or "domain"


def domain_slugs(names) -> dict[str, str]:
    """A distinct folder-safe (and Hub-repo-safe) name for each domain value: its `slugify`,
    with a digest of the value appended where several values share a slug ("Arts", "arts")
    or the value has no ASCII letter or digit ("наука", "科学"), so that no two domains
    write into one folder."""
    import hashlib

    names = list(names)
    slugs = {name: slugify(name) for name in names}
    taken: dict[str, int] = {}
    for slug in slugs.values():
        taken[slug] = taken.get(slug, 0) + 1
    for name, slug in slugs.items():
        if taken[slug] > 1 or not re.search(r"[A-Za-z0-9]", name):
            slugs[name] = f"{slug}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
    return slugs


def round_figure(value, digits: int = 4) -> float | None:
    """A figure for a JSON file: rounded, and None where it is missing, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None
