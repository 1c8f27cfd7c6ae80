"""What a run owns in its workdir: an exclusive claim, so two runs never write the same checkpoints,
and files that appear whole or not at all.

`claim_workdir` takes an advisory `fcntl.flock` on `<workdir>/.lock` and holds it for the life of
the process. The kernel drops the lock when the process ends, however it ends, so a SIGKILLed or
crashed run leaves no stale lock behind. The file names the holder, for the second run's message.
"""
import datetime
import errno
import fcntl
import os
import secrets
import socket

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
    fd, temporary = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _create_beside(path):
    """(descriptor, name) of a new hidden file beside `path`, with the mode `open(path, "w")` would give it
    (0o666 less the umask; `tempfile.mkstemp` makes 0o600 files, which other users of a shared run could not
    read)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:  # another writer drew the same name
            continue


OUTPUT_DIRS = ("checkpoints", "tensorboard", "figs")
OUTPUT_FILES = ("config.json", "metrics.jsonl", "results.json", "results.md", "train.log")
RUN_OUTPUTS = OUTPUT_DIRS + OUTPUT_FILES


def check_outputs(workdir):
    """Refuses a workdir where an output the run writes has the wrong kind (e.g. `checkpoints` a file,
    `metrics.jsonl` a directory), before anything is compiled or written."""
    for names, wanted, is_kind in ((OUTPUT_DIRS, "directory", os.path.isdir), (OUTPUT_FILES, "file", os.path.isfile)):
        for name in names:
            path = os.path.join(workdir, name)
            if os.path.lexists(path) and not is_kind(path):
                raise WorkdirError(f"{path} is not a {wanted}, and the run writes its {name} there; move it away or "
                                   "pass another --workdir")


def set_aside(workdir):
    """Moves the run outputs of `workdir` into a new `replaced-<UTC time>` folder of it; returns its path."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = os.path.join(workdir, f"replaced-{stamp}")
    os.makedirs(folder)
    for name in RUN_OUTPUTS:
        if os.path.lexists(os.path.join(workdir, name)):
            os.replace(os.path.join(workdir, name), os.path.join(folder, name))
    return folder
