"""What a run owns in its workdir: an exclusive claim, so two runs never write the same checkpoints,
and files that appear whole or not at all.

`claim_workdir` takes an advisory `fcntl.flock` on `<workdir>/.lock` and holds it for the life of
the process. The kernel drops the lock when the process ends, however it ends, so a SIGKILLed or
crashed run leaves no stale lock behind. The file names the holder, for the second run's message.
"""
import errno
import fcntl
import os
import socket
import tempfile

from absl import logging

from spcl_jax.errors import WorkdirError

LOCK_FILE = ".lock"
_held = {}  # real path of a claimed workdir -> the descriptor that holds its lock until the process ends


def claim_workdir(workdir):
    """Creates `workdir` if needed and claims it for this process; a second claim by it is a no-op.

    Raises WorkdirError when the workdir cannot be written or another process holds it.
    """
    path = os.path.realpath(workdir)
    if path in _held:
        return
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"cannot write to workdir {workdir} ({e.strerror or e}); pass a writable "
                           "--workdir") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            # Some network filesystems have no flock: run unguarded rather than not at all.
            logging.warning("cannot lock workdir %s (%s); make sure no other run uses it", workdir, e.strerror or e)
            os.close(fd)
            return
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise WorkdirError(f"workdir {workdir} is in use by another run ({holder}); wait for it to finish or "
                           "stop it, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[path] = fd


def write_atomic(path, write):
    """`write(file)` into a temporary file beside `path`, then rename: readers never see a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
