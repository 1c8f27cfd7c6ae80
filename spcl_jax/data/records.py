"""A prepared dataset: images re-encoded small, in array_record shards (FFCV's lesson, without FFCV).

    python -m spcl_jax.data.prepare imagenet --dataset_path SRC --out DST

writes DST/<split>-<i>-of-<n>.array_record (records of `RECORDS_PER_SHARD` images), per split
<split>_labels.npy and <split>_files.txt (the source file of every record, in record order), and last
`records.json` (classes, counts, shards, how the images were stored). A record is a small header
(label, the original image's upright height and width, whether the bytes hold it transposed) followed
by a JPEG whose shorter side is at most `max_side` (256 for crops of 224) and longer side at most
1.5 x that, landscape: exactly what the loader's canvas holds, so loading it is one decode and one copy.
JPEGs that already fit are kept byte for byte.

Interrupted? Run the same command again: finished shards (each renamed into place only when whole)
are kept, the rest written. `records.json` appears only when every shard is there, and a directory
without it is refused for training.
"""
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from spcl_jax.data import decode
from spcl_jax.data.sources import DecodingSource
from spcl_jax.errors import DataError

META = "records.json"
PLAN = ".records-plan.json"  # what an interrupted prepare was writing: a resume must write the same
FORMAT = "spcl_jax records v1"
RECORDS_PER_SHARD = 1024
HEADER = struct.Struct("<iIIB")  # label, original height, original width (upright), transposed
SPLITS = ("train", "test")


def encode_record(label: int, raw_size: Sequence[int], transposed: bool, jpeg: bytes) -> bytes:
    return HEADER.pack(int(label), int(raw_size[0]), int(raw_size[1]), int(transposed)) + bytes(jpeg)


def decode_record(record: bytes) -> tuple[int, tuple[int, int], bool, bytes]:
    """(label, (raw h, raw w), transposed, jpeg bytes) of one record."""
    label, height, width, transposed = HEADER.unpack_from(record)
    return label, (height, width), bool(transposed), record[HEADER.size:]


def shard_names(split: str, count: int) -> list[str]:
    shards = max(1, -(-count // RECORDS_PER_SHARD))
    return [f"{split}-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]


def is_prepared(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, META))


def was_interrupted(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, PLAN)) and not is_prepared(path)


def read_meta(path: str) -> dict[str, Any]:
    """The `records.json` of a prepared directory; DataError for a half-written or foreign one."""
    if was_interrupted(path):
        raise DataError(f"{path} is a prepare that did not finish: run the same `python -m spcl_jax.data.prepare "
                        "... --out` command again to complete it")
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{os.path.join(path, META)} cannot be read ({e}): prepare the dataset again") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} holds records of format {meta.get('format')!r}, this version reads {FORMAT!r}: "
                        "prepare the dataset again")
    return meta


class RecordSource(DecodingSource):
    """Images of one split of a prepared directory, decoded into canvases of `load_size`."""

    def __init__(self, root: str, split: str, meta: dict[str, Any], record_ids: np.ndarray, labels: np.ndarray,
                 load_size: int):
        super().__init__(labels, len(record_ids), load_size, skip_bad=False)
        self._paths = [os.path.join(root, name) for name in meta["splits"][split]["shards"]]
        self._counts = meta["splits"][split]["shard_counts"]
        self._record_ids = np.asarray(record_ids, np.int64)
        self._name = f"{split} records of {root}"
        self._reader = None

    def __getstate__(self):  # worker processes open their own readers
        return dict(self.__dict__, _reader=None)

    def _describe(self, i):
        return f"record {self._record_ids[i]} of the {self._name}"

    def _read(self, i):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            files = [f"{path}[0:{count}]" for path, count in zip(self._paths, self._counts)]  # no file opened yet
            self._reader = ArrayRecordDataSource(files)  # reads without readahead: random access
        _, raw_size, transposed, jpeg = decode_record(self._reader[int(self._record_ids[i])])
        return jpeg, raw_size, transposed


def open_split(root: str, split: str, load_size: int, select: Callable[[list[str]], Iterable[str]] | None = None
               ) -> tuple[RecordSource, list[str]]:
    """(source, classes) of a prepared split; `select(classes) -> chosen classes` keeps some of them."""
    meta = read_meta(root)
    classes = list(meta["classes"])
    labels = np.load(os.path.join(root, f"{split}_labels.npy"))
    chosen = classes if select is None else list(select(classes))
    remap = np.full(len(classes), -1, np.int64)
    remap[[classes.index(c) for c in chosen]] = np.arange(len(chosen))
    labels = remap[labels]
    keep = np.flatnonzero(labels >= 0)
    return RecordSource(root, split, meta, keep, labels[keep], load_size), chosen


def prepare(dataset: str, source_root: str, splits: dict[str, tuple[Sequence[str], Sequence[int] | np.ndarray]],
            classes: Sequence[str], out: str, *, max_side: int = 256, quality: int = 90, workers: int = 1,
            skip_bad: bool = False, log: Callable[[str], object] = print) -> dict[str, Any]:
    """Writes the records of `splits` ({split: (paths, labels)}) to `out`, resuming an interrupted prepare of
    the same listing and settings; returns records.json's content."""
    os.makedirs(out, exist_ok=True)
    plan = _plan(dataset, source_root, splits, max_side, quality, classes)
    plan_path = os.path.join(out, PLAN)
    if is_prepared(out):
        raise DataError(f"{out} already holds a prepared dataset: pass another --out or delete it")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            if json.load(f) != plan:
                raise DataError(f"{out} holds an unfinished prepare of other images or settings: delete it or pass "
                                "another --out")
        log(f"resuming the prepare in {out}")
    else:
        from spcl_jax.storage import write_atomic

        write_atomic(plan_path, lambda f: f.write(json.dumps(plan).encode()))
    jobs, names = [], {}
    for split, (paths, labels) in splits.items():
        names[split] = shard_names(split, len(paths))
        for i, name in enumerate(names[split]):
            part = slice(i * RECORDS_PER_SHARD, (i + 1) * RECORDS_PER_SHARD)
            if not os.path.isfile(os.path.join(out, name)):
                jobs.append((out, name, list(paths[part]), list(labels[part]), max_side, quality, skip_bad))
    total = sum(len(names[split]) for split in splits)
    log(f"writing {len(jobs)} of {total} shards to {out} with {workers} process(es)")
    _run(jobs, workers, log)
    results = {split: (list(paths), np.asarray(labels), [_shard_result(out, name) for name in names[split]])
               for split, (paths, labels) in splits.items()}
    meta = write_meta(out, plan, classes, results)
    os.unlink(plan_path)
    return meta


def _run(jobs, workers, log):
    if workers <= 1 or len(jobs) <= 1:
        _report(map(write_shard, jobs), len(jobs), log)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        _report(pool.imap_unordered(write_shard, jobs), len(jobs), log)


def _report(done, total, log):
    for count, (_, skipped) in enumerate(done, 1):
        for line in skipped:
            log(f"skipped {line}")
        if count % 50 == 0 or count == total:
            log(f"{count}/{total} shards written")


def _plan(dataset, source_root, splits, max_side, quality, classes):
    """What a prepare writes, as JSON: a resume with anything different is refused."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        paths, labels = splits[split]
        digest.update("\n".join(paths).encode())
        digest.update(np.asarray(labels, np.int64).tobytes())
    return {"format": FORMAT, "dataset": dataset, "source": os.path.abspath(source_root), "max_side": int(max_side),
            "quality": int(quality), "classes": list(classes), "listing_sha256": digest.hexdigest(),
            "counts": {split: len(paths) for split, (paths, _) in sorted(splits.items())}}


def _kept_path(out, name):
    return os.path.join(out, f".{name}.kept.json")


def _shard_result(out, name):
    with open(_kept_path(out, name)) as f:
        return name, json.load(f), None


def write_shard(job: tuple[str, str, Sequence[str], Sequence[int | np.integer], int, int, bool]
                ) -> tuple[str, list[str]]:
    """Writes one shard (a job: out dir, name, paths, labels, max_side, quality, skip_bad) to a temporary
    file, then its list of kept positions, then renames the shard into place; returns (name, skipped).
    Undecodable files raise DataError or, with skip_bad, are left out."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from spcl_jax.storage import write_atomic

    out, name, paths, labels, max_side, quality, skip_bad = job
    slot = np.empty((*decode.canvas_shape(max_side), 3), np.uint8)
    temporary = os.path.join(out, f".{name}.tmp")
    writer = ArrayRecordWriter(temporary, "group_size:1")
    kept, skipped = [], []
    try:
        for position, (path, label) in enumerate(zip(paths, labels)):
            try:
                with open(path, "rb") as f:
                    data = f.read()
                record = _record(data, int(label), slot, quality)
            except (OSError, decode.DecodeError) as e:
                if not skip_bad:
                    raise DataError(f"image file {path} cannot be decoded ({e}): delete or replace it, or pass "
                                    "--skip_bad_images to leave it out") from e
                skipped.append(f"{path} ({e})")
                continue
            writer.write(record)
            kept.append(position)
    finally:
        writer.close()
    write_atomic(_kept_path(out, name), lambda f: f.write(json.dumps(kept).encode()))
    os.replace(temporary, os.path.join(out, name))
    return name, skipped


def _record(data, label, slot, quality):
    """The record of one image file: its bytes kept when they already fit the canvas as a landscape JPEG."""
    import simplejpeg

    decoded = decode.decode_into(slot, data)
    height, width = decoded.size[::-1] if decoded.transposed else decoded.size
    if data[:2] == b"\xff\xd8" and not decoded.transposed and decoded.size == decoded.raw_size:
        jpeg = data
    else:
        jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(slot[:height, :width]), quality=quality,
                                      colorspace="RGB")
    return encode_record(label, decoded.raw_size, decoded.transposed, jpeg)


def write_meta(out: str, plan: dict[str, Any], classes: Sequence[str],
               results: dict[str, tuple[Sequence[str], np.ndarray, Sequence[tuple[str, Sequence[int], Any]]]]
               ) -> dict[str, Any]:
    """labels, file lists and, last, records.json from {split: (paths, labels, [(shard, kept positions, _)])}."""
    from spcl_jax.storage import write_atomic

    meta = dict(plan, classes=list(classes), splits={})
    for split, (paths, labels, shards) in results.items():
        kept = np.concatenate([np.asarray(k, np.int64) + i * RECORDS_PER_SHARD for i, (_, k, _) in enumerate(shards)])
        np.save(os.path.join(out, f"{split}_labels.npy"), np.asarray(labels, np.int64)[kept])
        write_atomic(os.path.join(out, f"{split}_files.txt"),
                     lambda f: f.write("".join(paths[i] + "\n" for i in kept).encode()))
        meta["splits"][split] = {"count": int(len(kept)), "shards": [name for name, _, _ in shards],
                                 "shard_counts": [len(k) for _, k, _ in shards]}
    write_atomic(os.path.join(out, META), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    for split, (_, _, shards) in results.items():
        for name, _, _ in shards:
            os.unlink(_kept_path(out, name))
    return meta
