"""Where a run's files live: a local disk, or object storage (`gs://bucket/path`) for TPU pods whose hosts
share no filesystem. One set of functions for both, so callers never branch on the kind of path.

Objects cannot be renamed or appended to, so on gs:// each guarantee is kept another way:
- whole files (`write_atomic`): one upload. GCS shows an object only once its upload is complete, so a
  reader sees the old object or the new one, never part of one (on a disk: a temporary file and a rename).
- logs that grow (`AppendLog`: metrics.jsonl, train.log): lines are held in memory and uploaded every
  `interval` seconds, at `sync` and at exit, as one small object that a single compose request joins to the
  end of the log. A crash loses at most the lines since the last upload and never leaves half a line.
  Rewriting the whole log instead would upload megabytes per flush on a long run.
- moves (`move`: `replaced-<time>/`, `<step>.diverged`): a copy of every object, and the originals deleted
  only once the copy is complete.

gs:// goes through Google's client library, which finds credentials itself (application default credentials:
on a TPU VM or GCE host, the machine's service account). `STORAGE_EMULATOR_HOST` (e.g. http://127.0.0.1:9023)
points it, gcsfs and, through the variables `use_emulator_if_set` fills in, orbax's tensorstore at an emulator.
"""
from __future__ import annotations

import atexit
import functools
import io
import os
import posixpath
import secrets
import time
from typing import TYPE_CHECKING, BinaryIO, Callable

from absl import logging

if TYPE_CHECKING:
    from google.cloud.storage import Blob

URL_SCHEME = "gs://"


def use_emulator_if_set() -> None:
    """With STORAGE_EMULATOR_HOST set, every gs:// access of this process goes to that emulator: tensorstore
    (orbax's arrays) reads its own variables, and gcsfs (orbax's directories) skips its bucket-layout
    lookup, a gRPC call an emulator does not answer. Called when spcl_jax is imported."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_url(path: str | os.PathLike) -> bool:
    return str(path).startswith(URL_SCHEME)


def unsupported_scheme(path: str | os.PathLike) -> str | None:
    """The scheme of `path` if it is a URL this library cannot write (s3://, hdfs://, ...), else None."""
    path = str(path)
    scheme = path.split("://", 1)[0] if "://" in path else None
    return scheme if scheme and not is_url(path) else None


def join(path: str | os.PathLike, *names: str) -> str:
    return posixpath.join(str(path), *names) if is_url(path) else os.path.join(path, *names)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (orbax needs one); a URL as it is, without a trailing slash."""
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(path)


def parent(path: str | os.PathLike) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(os.path.abspath(path))


def _split(url):
    bucket, _, key = str(url)[len(URL_SCHEME):].partition("/")
    return bucket, key.rstrip("/")


@functools.cache
def _client():
    from google.cloud import storage

    return storage.Client()


def _bucket(url):
    return _client().bucket(_split(url)[0])


def gcs_object(url: str) -> Blob:
    """The client library's Blob of a gs:// URL."""
    bucket, key = _split(url)
    return _client().bucket(bucket).blob(key)


class os_errors:  # noqa: N801 - used as a function: `with os_errors(url):`
    """Turns the client library's errors into the OSErrors a local path raises (FileNotFoundError,
    PermissionError, ...), so that callers handle both kinds of path with one `except`."""

    def __init__(self, url: str | os.PathLike):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or isinstance(error, OSError):
            return False
        from google.api_core import exceptions

        if isinstance(error, exceptions.NotFound):
            raise FileNotFoundError(2, f"no such object ({error.message})", self.url) from error
        if isinstance(error, (exceptions.Forbidden, exceptions.Unauthorized)):
            raise PermissionError(13, f"permission denied ({error.message}); check the credentials "
                                  "(application default credentials) and the bucket's permissions", self.url) from error
        if isinstance(error, exceptions.GoogleAPIError):
            raise OSError(5, str(error).splitlines()[0] if str(error) else type(error).__name__, self.url) from error
        return False


def _prefix(url):
    """The object-name prefix of everything under a gs:// folder."""
    key = _split(url)[1]
    return f"{key}/" if key else ""


def _blobs_under(url, **options):
    return _client().list_blobs(_split(url)[0], prefix=_prefix(url), **options)


def isfile(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    with os_errors(path):
        return bool(_split(path)[1]) and gcs_object(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """A URL is a directory when an object lies under it (object storage has no empty folders)."""
    if not is_url(path):
        return os.path.isdir(path)
    with os_errors(path):
        return any(True for _ in _blobs_under(path, max_results=1))


def exists(path: str | os.PathLike) -> bool:
    return os.path.lexists(path) if not is_url(path) else isfile(path) or isdir(path)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under `path` (files and folders), as `os.listdir`."""
    if not is_url(path):
        return os.listdir(path)
    with os_errors(path):
        prefix = _prefix(path)
        pages = _blobs_under(path, delimiter="/")
        names = [blob.name[len(prefix):] for blob in pages]
        names += [folder[len(prefix):].rstrip("/") for folder in pages.prefixes]
    return sorted(name for name in names if name)


def sizes_under(url: str) -> dict[str, int]:
    """{path relative to `url`: size in bytes} of every object under a gs:// folder."""
    with os_errors(url):
        prefix = _prefix(url)
        return {blob.name[len(prefix):]: blob.size for blob in _blobs_under(url)}


def download(url: str, path: str) -> None:
    """Copies the object at `url` to the local file `path`, which appears whole or not at all (`write_atomic`)."""
    def fetch(f: BinaryIO) -> None:
        with os_errors(url):
            gcs_object(url).download_to_file(f)

    write_atomic(path, fetch)


def makedirs(path: str | os.PathLike) -> None:
    """A local directory and its parents; nothing for a URL (a folder exists once an object lies in it)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    with os_errors(path):
        return gcs_object(path).download_as_bytes()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` and publish the result whole: readers see the previous file or the new one, never part.

    Local: a temporary file beside `path`, fsync, rename. gs://: one upload of the bytes written."""
    if is_url(path):
        buffer = io.BytesIO()
        write(buffer)
        with os_errors(path):
            gcs_object(path).upload_from_string(buffer.getvalue())
        return
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


def move(source: str, destination: str, *, markers: tuple[str, ...] = ()) -> None:
    """Moves a file or folder. gs://: copies every object, then deletes the originals once all copies exist,
    so an interrupted move leaves the original whole (and perhaps part of a copy). Objects named in `markers`
    (e.g. orbax's `commit_success.txt`, which says a step is complete) are deleted first: an interrupted
    deletion then leaves no marker over a partial folder."""
    if not is_url(source):
        os.replace(source, destination)
        return
    with os_errors(source):
        bucket = _bucket(source)
        blob = gcs_object(source)
        if _split(source)[1] and blob.exists():
            pairs = [(blob, _split(destination)[1])]
        else:
            key, target = _split(source)[1], _split(destination)[1]
            pairs = [(b, target + b.name[len(key):]) for b in _blobs_under(source)]
        for original, name in pairs:
            bucket.copy_blob(original, _bucket(destination), name)
        for original, _ in sorted(pairs, key=lambda pair: posixpath.basename(pair[0].name) not in markers):
            original.delete()


def drop_partial_last_line(path: str, chunk: int = 1 << 16) -> None:
    """Cuts the end of a local `path` back to its last newline: a run killed while writing a record leaves half a
    line, which the resumed run's next record would otherwise continue (one line no JSON parser reads)."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(position - chunk, 0)
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                position = start + newline + 1
                break
            position = start
        if position < end:
            logging.warning("%s ended in a half-written record (the previous run was stopped while writing it): "
                            "dropped its %d bytes", path, end - position)
            f.truncate(position)


class AppendLog:
    """A text log that only grows, line by line, continued by a resumed run: `write`, `flush` (cheap; on gs://
    it uploads only when `interval` seconds have passed since the last upload), `sync` (everything written is
    stored now) and `close`. A `logging.StreamHandler` can write to it."""

    def __init__(self, path: str | os.PathLike, *, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.path = str(path)
        self._remote = is_url(path)
        if not self._remote:
            drop_partial_last_line(self.path)
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")
            return
        self._interval, self._clock = interval, clock
        self._pending = []
        self._uploaded_at = clock()
        atexit.register(self._sync_at_exit)  # a run ended by an exception still stores its last lines
        with os_errors(self.path):
            self._exists = gcs_object(self.path).exists()
            for stray in _client().list_blobs(_split(self.path)[0], prefix=_split(self.path)[1] + ".part-"):
                stray.delete()  # the lines of an upload that a crash cut off before its compose

    def write(self, text: str | bytes) -> None:
        """Appends `text` (str; on gs:// also bytes, e.g. TensorBoard's records)."""
        if not self._remote:
            self._file.write(text)
        elif text:
            self._pending.append(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def flush(self) -> None:
        if not self._remote:
            self._file.flush()
        elif self._pending and self._clock() - self._uploaded_at >= self._interval:
            self.sync()

    def sync(self) -> None:
        if not self._remote:
            self._file.flush()
            os.fsync(self._file.fileno())
            return
        if not self._pending:
            return
        data = b"".join(self._pending)
        with os_errors(self.path):
            bucket, key = _split(self.path)
            target = gcs_object(self.path)
            part = _client().bucket(bucket).blob(f"{key}.part-{time.time_ns()}-{secrets.token_hex(2)}")
            part.upload_from_string(data)
            target.compose([target, part] if self._exists else [part])
            part.delete()
        self._exists = True
        self._pending = []
        self._uploaded_at = self._clock()

    def close(self) -> None:
        if self._remote:
            self.sync()
            atexit.unregister(self._sync_at_exit)
        else:
            self._file.close()

    def _sync_at_exit(self):
        try:
            self.sync()
        except OSError as e:
            logging.warning("the last lines of %s could not be stored (%s)", self.path, e)

    @property
    def closed(self) -> bool:
        return False if self._remote else self._file.closed
