"""The spool: received instances and results waiting for delivery, written durably to disk.

Layout under ``MEDSERVE_SPOOL_DIR``: ``instances/<SOP Instance UID>.dcm`` (as received, byte for byte) and
``results/<job id>.dcm`` (a result until it is delivered). A file is written to a temporary name in the same
folder, flushed and fsync'ed, renamed into place, and the folder fsync'ed: after ``write`` returns, the file
survives a crash or power cut, and a crash during the write leaves no half-written file under the real name
(temporary files left by a crash are removed at start).

``MEDSERVE_SPOOL_MAX_BYTES`` (0: no limit) bounds the received instances held: a write that would pass it, or
one the disk refuses (ENOSPC, EDQUOT), raises ``SpoolFull`` with nothing left behind. The count is kept per
process (started from what is on disk), so replicas sharing one folder each apply the limit to what they see.
A helper process that writes received instances for the service (the DICOM node, ``app.pacs.dimse_node``)
opens the folder with ``owner=False`` and ``receive``s into it; the service counts those files with ``adopt``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import threading
import uuid
from pathlib import Path

logger = logging.getLogger("medserve.pacs.spool")

INSTANCES = "instances"
RESULTS = "results"
_UID = re.compile(r"^[0-9]{1,64}(\.[0-9]{1,64}){0,63}$")
_TEMPORARY_SUFFIX = ".partial"
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class SpoolFull(OSError):
    """The spool has no room for this file (its limit or the disk); nothing was written."""


# A temporary name no other writer uses (replicas may share the folder): a token of this process, a counter.
_PROCESS_TOKEN = uuid.uuid4().hex[:16]
_TEMPORARY_NAMES = itertools.count()


class Spool:
    """Durable files under ``root``; thread-safe.

    Args:
        root: the spool folder (created when missing).
        max_bytes: most bytes of received instances (0: no limit but the disk's).
        owner: the service's own spool: temporary files left by a crash are removed and the instances' bytes
            counted at start. A helper process writing for the service (``receive``) passes False: the
            service's writes in progress are left alone, and the count is the service's (``adopt``).
    """

    def __init__(self, root: Path, max_bytes: int = 0, *, owner: bool = True) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.instances = root / INSTANCES
        self.results = root / RESULTS
        for folder in (self.instances, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._used = 0
        # The folders stay open: fsync of a folder is one system call, not open + fsync + close (each a release
        # and a re-take of the GIL, which costs most when the model's threads keep it busy).
        self._folder_fds: dict[Path, int] = {}
        for folder in (self.instances, self.results) if owner else ():
            for entry in os.scandir(folder):
                if entry.name.endswith(_TEMPORARY_SUFFIX):  # a crash in the middle of a write
                    Path(entry.path).unlink(missing_ok=True)
                elif folder is self.instances and entry.is_file():
                    self._used += entry.stat().st_size

    @property
    def used_bytes(self) -> int:
        """Bytes of received instances in the spool (as this process counts them)."""
        return self._used

    def instance_path(self, sop_instance_uid: str) -> Path:
        """Where the instance with this SOP Instance UID is spooled.

        Raises:
            ValueError: not a valid UID (it names a file: only digits and dots).
        """
        if not _UID.match(sop_instance_uid) or len(sop_instance_uid) > 64:
            raise ValueError("not a valid SOP Instance UID")
        return self.instances / f"{sop_instance_uid}.dcm"

    def result_path(self, job_id: int) -> Path:
        return self.results / f"{int(job_id)}.dcm"

    def _fsync(self, folder: Path) -> None:
        descriptor = self._folder_fds.get(folder)
        if descriptor is None:
            with self._lock:
                descriptor = self._folder_fds.get(folder)
                if descriptor is None:
                    descriptor = self._folder_fds[folder] = os.open(folder, os.O_RDONLY)
        os.fsync(descriptor)

    def close(self) -> None:
        """Closes the folders kept open (the spool still works afterwards: they are opened again)."""
        with self._lock:
            descriptors, self._folder_fds = list(self._folder_fds.values()), {}
        for descriptor in descriptors:
            os.close(descriptor)

    def write_instance(self, sop_instance_uid: str, data: bytes, *, sync_folder: bool = True) -> Path:
        """Writes a received instance durably (replacing an earlier copy of the same UID atomically); raises
        as ``put_instance``."""
        return self.put_instance(sop_instance_uid, data, sync_folder=sync_folder)[0]

    def put_instance(
        self, sop_instance_uid: str, data: bytes, *, sync_folder: bool = True
    ) -> tuple[Path, bool]:
        """``write_instance``, also saying whether an earlier copy was there (one look at the disk for both).

        ``sync_folder=False`` leaves the folder's fsync to the caller (``sync_instances``, once for several
        files): the rename is durable only after it.

        Raises:
            SpoolFull: over ``max_bytes`` or the disk is full; nothing was written.
            ValueError: an invalid UID.
        """
        target = self.instance_path(sop_instance_uid)
        previous = self._previous_size(target)
        # counted before the write: concurrent writers cannot overshoot the limit together
        self.adopt(len(data), previous)
        try:
            self._write(target, data, sync_folder=sync_folder)
        except BaseException:
            with self._lock:
                self._used -= len(data) - (previous or 0)
            raise
        return target, previous is not None

    @staticmethod
    def _previous_size(target: Path) -> int | None:
        try:
            return os.stat(target).st_size
        except FileNotFoundError:
            return None

    def receive(self, sop_instance_uid: str, data: bytes) -> tuple[Path, int | None]:
        """Writes a received instance durably (folder flushed too) for the service, which counts it (``adopt``):
        nothing is counted or limited here but the disk. Returns the file and the size of the earlier copy it
        replaced (None when there was none).

        Raises:
            SpoolFull: the disk is full; nothing was written.
            ValueError: an invalid UID.
        """
        target = self.instance_path(sop_instance_uid)
        previous = self._previous_size(target)
        self._write(target, data)
        return target, previous

    def adopt(self, size: int, previous: int | None) -> None:
        """Counts a received instance of ``size`` bytes (replacing one of ``previous`` bytes, or None) against
        ``max_bytes``: before its own writes, and for the files a helper process ``receive``d.

        Raises:
            SpoolFull: it would pass ``max_bytes``; nothing was counted.
        """
        delta = size - (previous or 0)
        with self._lock:
            if self.max_bytes and self._used + delta > self.max_bytes:
                raise SpoolFull(
                    errno.ENOSPC,
                    f"the spool holds {self._used} bytes; this instance ({size} bytes) would pass "
                    f"MEDSERVE_SPOOL_MAX_BYTES={self.max_bytes}",
                )
            self._used += delta

    def write_result(self, job_id: int, data: bytes) -> Path:
        """Writes a job's result durably (results do not count against ``max_bytes``).

        Raises:
            SpoolFull: the disk is full; nothing was written.
        """
        target = self.result_path(job_id)
        self._write(target, data)
        return target

    def sync_instances(self) -> None:
        """Makes the renames of ``write_instance(..., sync_folder=False)`` durable (fsync of the folder)."""
        self._fsync(self.instances)

    def _write(self, target: Path, data: bytes, *, sync_folder: bool = True) -> None:
        temporary = target.with_name(
            f".{target.name}.{_PROCESS_TOKEN}.{next(_TEMPORARY_NAMES)}{_TEMPORARY_SUFFIX}"
        )
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(descriptor, view) :]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, target)
            if sync_folder:
                self._fsync(target.parent)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in _DISK_FULL:
                raise SpoolFull(exc.errno, f"the spool disk is full ({os.strerror(exc.errno)})") from exc
            raise

    def delete(self, path: str | Path) -> None:
        """Deletes a spooled file (gone already: nothing to do); instances give their bytes back."""
        path = Path(path)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return
        if path.parent == self.instances:
            with self._lock:
                self._used = max(0, self._used - size)

    def delete_uncounted(self, path: str | Path) -> None:
        """Deletes a file ``receive``d that was never counted (its ``adopt`` refused it, or it never came)."""
        Path(path).unlink(missing_ok=True)
