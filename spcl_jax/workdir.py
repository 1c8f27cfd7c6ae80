"""What a run owns in its workdir: an exclusive claim, so two runs never write the same checkpoints.

On a disk, `claim_workdir` takes an advisory `fcntl.flock` on `<workdir>/.lock` and holds it for the life
of the process. The kernel drops the lock when the process ends, however it ends, so a SIGKILLed or
crashed run leaves no stale lock behind. The file names the holder, for the second run's message.

Object storage has no locks: on gs:// the claim is a lease object (`lease.py`).
"""
import datetime
import errno
import fcntl
import os
import socket

from absl import logging

from spcl_jax import lease, storage
from spcl_jax.errors import WorkdirError

LOCK_FILE = ".lock"
_held = {}  # real path (or URL) of a claimed workdir -> its lock's descriptor, or its Lease


def claim_workdir(workdir: str) -> None:
    """Creates `workdir` if needed and claims it for this process; a second claim by it is a no-op.

    Raises WorkdirError when the workdir cannot be written or another process holds it.
    """
    path = storage.absolute(workdir) if storage.is_url(workdir) else os.path.realpath(workdir)
    if path in _held:
        return
    if storage.is_url(workdir):
        _held[path] = lease.Lease.take(storage.join(path, lease.LEASE_OBJECT), what=f"workdir {workdir}")
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


def release_claims() -> None:
    """Gives back every claim of this process (the claims of a run otherwise last as long as its process: a
    resume in the same process, as tests do, claims again for free)."""
    while _held:
        held = _held.popitem()[1]
        if isinstance(held, lease.Lease):
            held.release()
        else:
            os.close(held)


COMMIT_MARKER = "commit_success.txt"  # orbax on gs://: written last into a step's folder, which cannot be renamed

OUTPUT_DIRS = ("checkpoints", "tensorboard", "figs")
OUTPUT_FILES = ("config.json", "metrics.jsonl", "results.json", "results.md", "train.log")
RUN_OUTPUTS = OUTPUT_DIRS + OUTPUT_FILES


def check_outputs(workdir: str) -> None:
    """Refuses a workdir where an output the run writes has the wrong kind (e.g. `checkpoints` a file,
    `metrics.jsonl` a directory), before anything is compiled or written. A bucket that cannot be read is one line."""
    for names, wanted, is_kind in ((OUTPUT_DIRS, "directory", storage.isdir), (OUTPUT_FILES, "file", storage.isfile)):
        for name in names:
            path = storage.join(workdir, name)
            try:
                wrong = storage.exists(path) and not is_kind(path)
            except OSError as e:
                raise WorkdirError(f"cannot read workdir {workdir} ({e.strerror or e}); check the bucket, the "
                                   "credentials (application default credentials) and the network, or pass another "
                                   "--workdir") from e
            if wrong:
                raise WorkdirError(f"{path} is not a {wanted}, and the run writes its {name} there; move it away or "
                                   "pass another --workdir")


def set_aside(workdir: str) -> str:
    """Moves the run outputs of `workdir` into a new `replaced-<UTC time>` folder of it; returns its path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = storage.join(workdir, f"replaced-{stamp}")
    if not storage.is_url(folder):
        os.makedirs(folder)
    for name in RUN_OUTPUTS:
        if storage.exists(storage.join(workdir, name)):
            storage.move(storage.join(workdir, name), storage.join(folder, name), markers=(COMMIT_MARKER,))
    return folder
