"""One live run per gs:// workdir, without locks: a lease object that its holder keeps renewing.

- Taking: the lease object is created only if absent (a generation precondition: of two runs that try at
  once, GCS lets exactly one succeed). It names the holder's host, process and start time.
- Holding: a thread rewrites it every `seconds / 5`, each time only if it is still the generation this run
  wrote; a run that finds its lease gone or rewritten, or that could not renew it for `0.8 * seconds`, ends
  at once (exit status 75) rather than write beside another run.
- A stale lease (its run died without releasing it) is one whose generation stays unchanged for `seconds`
  of watching, after its own renewal time says it lapsed; the new run then deletes exactly that generation
  and takes the lease as above. A live holder renews within `seconds / 5`, so it is never taken over; clocks
  need not agree, since the watching alone decides.
- Releasing: at exit (a finished run, SIGTERM, an error) the lease is deleted, so the same command resumes
  at once; after a SIGKILL or a lost host it resumes once the lease lapsed (`seconds` to 2 x `seconds`).
"""
import atexit
import datetime
import json
import os
import secrets
import socket
import threading
import time
from typing import Callable

from absl import logging

from spcl_jax import storage
from spcl_jax.errors import WorkdirError

LEASE_OBJECT = ".lease"
LEASE_SECONDS = 60.0
LOST_LEASE_EXIT = 75  # EX_TEMPFAIL: the same command can run again once the other run is gone


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class Lease:
    """A taken lease on `url` (see the module docstring); `release` gives it back."""

    def __init__(self, url: str, seconds: float, what: str):
        self.url, self.seconds, self.what = url, float(seconds), what
        self.blob = storage.gcs_object(url)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": _now().isoformat(timespec="seconds"), "seconds": self.seconds,
                       "token": secrets.token_hex(8)}
        self.generation = None
        self.now = _now  # the clock of the renewal times written (a test skews it)
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def take(cls, url: str, *, seconds: float = LEASE_SECONDS, what: str | None = None,
             clock: Callable[[], float] = time.monotonic) -> "Lease":
        """The lease on `url`, taken for this process and renewed until it exits; WorkdirError when a live run
        holds it."""
        lease = cls(url, seconds, what or url)
        with storage.os_errors(url):
            lease._acquire(clock)
        lease._thread = threading.Thread(target=lease._renew_until_stopped, args=(clock,), daemon=True,
                                         name="workdir-lease")
        lease._thread.start()
        atexit.register(lease.release)
        return lease

    def _requests(self):
        """Each request's timeout and retries end within a fifth of the lease (the default retries for 120 s)."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        return {"timeout": self.seconds / 10, "retry": DEFAULT_RETRY.with_timeout(self.seconds / 5)}

    def _write(self, generation):
        """Writes this run's record if the object's generation is `generation` (0: absent); False if not."""
        from google.api_core import exceptions

        self.record["renewed"] = self.now().isoformat(timespec="seconds")
        try:
            self.blob.upload_from_string(json.dumps(self.record), content_type="application/json",
                                         if_generation_match=generation, **self._requests())
        except exceptions.PreconditionFailed:
            return False
        self.generation = self.blob.generation
        return True

    def _holder(self):
        """(record, generation) of the lease object as stored now, or (None, None) if there is none."""
        from google.api_core import exceptions

        bucket, name = self.blob.bucket, self.blob.name
        blob = bucket.get_blob(name, **self._requests())
        if blob is None:
            return None, None
        generation = blob.generation  # a download may reset it (an emulator sends no generation header)
        try:
            data = blob.download_as_bytes(if_generation_match=generation, **self._requests())
        except (exceptions.NotFound, exceptions.PreconditionFailed):  # changed since: look again
            return self._holder()
        try:
            record = json.loads(data)
        except ValueError:
            record = {}
        return record, generation

    def _acquire(self, clock):
        from google.api_core import exceptions

        while True:
            holder, generation = self._holder()  # read first as well: a precondition alone would do on GCS
            if holder is None:
                if self._write(0):
                    return
                continue  # another run took it between our read and our write: look at it
            if not self._lapsed(holder):
                raise self._refusal(holder)
            changed, now = self._watch(generation, clock)
            if changed:  # renewed (or taken) while watched: live
                if now is None:
                    continue  # released meanwhile: free
                raise self._refusal(now)
            logging.warning("%s: the lease of the run of pid %s on %s (started %s) lapsed; taking it over",
                            self.what, holder.get("pid"), holder.get("host"), holder.get("started"))
            try:
                self.blob.delete(if_generation_match=generation, **self._requests())
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                pass  # released or taken by someone else meanwhile: look again

    def _lapsed(self, holder):
        try:
            renewed = datetime.datetime.fromisoformat(holder["renewed"])
            return (_now() - renewed).total_seconds() > float(holder.get("seconds", self.seconds))
        except (KeyError, TypeError, ValueError):
            return True  # unreadable: the watching decides

    def _watch(self, generation, clock):
        """(changed, holder): whether the lease object changed (renewed, released or taken) within `seconds` of
        watching, and its holder's record then (None: released)."""
        logging.info("%s: its lease looks lapsed; watching it for %.0f s before taking it over", self.what,
                     self.seconds)
        deadline = clock() + self.seconds
        while clock() < deadline:
            time.sleep(min(1.0, self.seconds / 10))
            holder, now = self._holder()
            if now != generation:
                return True, holder
        return False, None

    def _refusal(self, holder):
        return WorkdirError(
            f"{self.what} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}; if that run died, its lease, renewed {holder.get('renewed')}, lapses "
            f"{float(holder.get('seconds', self.seconds)):g} s after that); wait for it to finish or stop it, or pass "
            "another --workdir")

    def _renew_until_stopped(self, clock):
        renewed = clock()
        while not self._stop.wait(self.seconds / 5):
            try:
                holder, generation = self._holder()
                if generation != self.generation or (holder or {}).get("token") != self.record["token"]:
                    return self._lost(f"it now belongs to pid {holder.get('pid')} on {holder.get('host')}"
                                      if holder else "it was deleted")
                if not self._write(self.generation):
                    return self._lost("another run rewrote it")
                renewed = clock()
            except Exception as e:  # the network or the service: retry until the lease could lapse
                if clock() - renewed > 0.8 * self.seconds:
                    return self._lost(f"it could not be renewed for {clock() - renewed:.0f} s ({e})")
                logging.warning("%s: renewing its lease failed (%s); retrying", self.what, e)

    def _lost(self, why):
        logging.error("%s: this run lost its lease (%s); stopping at once so that two runs never write one "
                      "workdir. The last checkpoint is intact; run the same command again once the other run is "
                      "gone", self.what, why)
        logging.flush()
        os._exit(LOST_LEASE_EXIT)

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still this run's."""
        if self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        if self._thread is not None:
            self._thread.join()
        try:
            self.blob.delete(if_generation_match=self.generation, **self._requests())
        except Exception as e:  # noqa: BLE001 - gone or taken: nothing of ours to delete
            logging.info("%s: its lease was not deleted (%s)", self.what, e)
