"""Prepared records on gs://, read from a local copy that each host makes once.

array_record's reader takes local files (given a gs:// shard, against an emulator, it did not return), and a
random-access read over HTTP costs a network round trip per image, where a local record costs 0.48 ms of host
CPU. So a run whose `dataset_path` is a gs:// folder of prepared records copies it to
`<records_cache_dir>/<bucket>/<path>` on every host before it lists the data. The copy resumes: a file already
there with the object's size is kept, each file is downloaded to a temporary name and renamed when whole
(`storage.download`), and `records.json`, by which a folder counts as prepared, comes last.
"""
import os

from absl import logging

from spcl_jax import progress, storage
from spcl_jax.data import records
from spcl_jax.errors import DataError


def local_copy(url: str, cache_dir: str) -> str:
    """The local folder holding a complete copy of the prepared records at `url` (copied now if needed)."""
    if not cache_dir:
        raise DataError(f"dataset_path={url} is on object storage, and records_cache_dir is empty: pass "
                        "--config.records_cache_dir=DIR on a local disk with room for the records")
    objects = storage.sizes_under(url)
    if records.META not in objects:
        raise DataError(f"dataset_path={url} holds no prepared records ({records.META} missing): image folders are "
                        f"read from a local disk; on gs:// pass the --out of `python -m spcl_jax.data.prepare` "
                        "(copied there whole, records.json included)")
    bucket_and_path = url[len(storage.URL_SCHEME):].rstrip("/")
    local = os.path.join(os.path.expanduser(cache_dir), *bucket_and_path.split("/"))
    missing = {name: size for name, size in objects.items()
               if not (os.path.isfile(os.path.join(local, name)) and os.path.getsize(os.path.join(local, name)) == size)}
    if not missing and records.is_prepared(local):
        return local
    total = sum(missing.values())
    announcement = progress.Announcement(f"copying {len(missing)} files ({total / 1e9:.2f} GB) of the records at "
                                         f"{url} to {local}")
    try:
        os.makedirs(local, exist_ok=True)
        for name in sorted(missing, key=lambda n: n == records.META):  # records.json last
            path = os.path.join(local, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            storage.download(storage.join(url, name), path)
    except OSError as e:
        raise DataError(f"copying the records at {url} to {local} failed ({e.strerror or e}); free disk space or "
                        "pass another --config.records_cache_dir, then run the same command (the copy resumes)"
                        ) from e
    announcement.done("copied", f" ({total / 1e9 / max(announcement.seconds, 1e-9):.2f} GB/s)")
    logging.info("the records of %s are read from %s", url, local)
    return local
