"""The DICOM node in a process of its own, its C-STOREs handed to the service's intake over a local socket.

pynetdicom is built on threads that poll: each association's reactor and its DUL provider wake every
millisecond, every PDU is decoded in Python, and its server calls ``gc.collect()`` itself every 60 polls. In the
service's process all of that holds the interpreter lock that the HTTP requests, the jobs and the model's
thread need (measured: about 20 ms more service CPU per instance by C-STORE than by STOW-RS, and C-STOREs
accepted more slowly than ``/segment`` answers). So the node (``app.pacs.dimse.DimseServer``, unchanged) runs in
a child process (``python -m app.pacs.dimse_node``) and the service keeps the one intake, store, spool and
metrics:

- ``DimseProcess`` (in the service) listens on a Unix socket in a private folder (``multiprocessing.connection``,
  with an authentication key), starts the child with its configuration on the child's standard input, and waits
  for the child's first line: ``listening PORT`` or ``error ERRNO TEXT`` (raised as ``OSError``, so that a port in
  use is told apart as before). Each of the child's associations connects once, and the service answers each
  C-STORE with the intake's outcome (JSON) after the instance was spooled and recorded, as the in-process node
  did: the caller's success still means the instance is durable.
- With the service's intake (``app.pacs.intake.Intake``) the child checks each instance itself
  (``inspect_instance``) and writes it into the intake's spool (``Spool.receive``: fsync'ed, folder flushed);
  the service gets a small message (the UIDs, the routing attributes, the file and its size) and only counts,
  routes and records it (``Intake.accept_spooled``): one commit. Measured, the service's share of a C-STORE had
  been most of its round trip, because each of its system calls gave up the interpreter lock that the job path
  keeps busy, and taking it back costs up to the switch interval (5 ms). An instance the service refuses, or
  that it cannot take now, is deleted again by whoever wrote it last. With another intake (tests), the
  instance's Part 10 bytes cross instead.
- The child dies with the service: Linux's parent-death signal, and the end of its standard input (closed by
  ``stop()``, or by the kernel when the service is killed) stops it. A child that exits on its own is started
  again after ``RESTART_DELAY_S``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from app.pacs.children import die_with_parent
from app.pacs.dimse import SOURCE, AllowedPeer, DimseServer, IntakeLike, parse_allowed
from app.pacs.intake import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    AcceptResult,
    InstanceError,
    Intake,
    IntakeUnavailable,
    SpooledInstance,
    inspect_instance,
    not_yet_accepted,
)
from app.pacs.spool import Spool, SpoolFull
from app.settings import Settings, env_name

logger = logging.getLogger("medserve.pacs.dimse")

START_TIMEOUT_S = 60.0  # the child imports pynetdicom and pydicom before it listens
STOP_TIMEOUT_S = 10.0
RESTART_DELAY_S = 1.0
NOT_READY = "MedServe is not ready to accept instances"


@dataclass(frozen=True)
class NodeConfig:
    """What the child needs (sent as JSON on its standard input): the node's settings, with the allowed callers
    already resolved by the service, and where and how to reach the service's intake."""

    ae_title: str
    port: int
    host: str
    allowed: list[tuple[str, str, list[str]]]  # (AE title, host, addresses)
    timeout_s: float
    max_associations: int
    bridge: str
    authkey: str
    log_format: str
    log_level: str
    spool: str | None = None  # the intake's spool folder: the child checks and spools instances itself

    def peers(self) -> list[AllowedPeer]:
        return [AllowedPeer(ae, host, frozenset(addresses)) for ae, host, addresses in self.allowed]


# The messages of the bridge (child -> service), by their first byte; the service answers each with JSON.
BYTES = b"B"  # the instance's Part 10 bytes, for the intake to check and spool
SPOOLED = b"S"  # a SpooledInstance (JSON): checked and spooled by the child
REFUSED = b"R"  # an AcceptResult (JSON) of an instance the child refused: counted, and echoed back


# ---- the service's side -------------------------------------------------------------------------------------------


def _outcome(accept: Callable[[], AcceptResult]) -> dict[str, Any]:
    try:
        result = accept()
    except IntakeUnavailable as exc:
        return {"unavailable": str(exc)}
    except Exception:
        logger.exception("C-STORE: the intake failed")
        return {"error": "the intake failed"}
    return {"result": dataclasses.asdict(result)}


def answer(intake: IntakeLike | None, data: bytes) -> dict[str, Any]:
    """The intake's outcome for one instance, as the child reads it."""
    if intake is None:
        return {"unavailable": NOT_READY}
    return _outcome(lambda: intake.accept_bytes(data, SOURCE))


def answer_spooled(intake: IntakeLike | None, payload: dict[str, Any]) -> dict[str, Any]:
    """The intake's outcome for an instance the child spooled; "unavailable" and "error" mean that nothing was
    recorded (the child deletes the file it wrote)."""
    if not isinstance(intake, Intake):
        return {"unavailable": NOT_READY}
    return _outcome(lambda: intake.accept_spooled(SpooledInstance.from_json(payload), SOURCE))


def answer_message(intake: IntakeLike | None, message: bytes) -> dict[str, Any]:
    """The answer to one bridge message (``BYTES``, ``SPOOLED`` or ``REFUSED``)."""
    kind, body = message[:1], message[1:]
    if kind == BYTES:
        return answer(intake, body)
    if kind == SPOOLED:
        return answer_spooled(intake, json.loads(body))
    if kind == REFUSED:
        refused = json.loads(body)
        if isinstance(intake, Intake):
            intake.observe_refused(SOURCE)
        return {"result": refused}
    return {"error": "the intake failed"}


class DimseProcess:
    """The DICOM node as a child process, with ``DimseServer``'s face (``start``, ``stop``, ``running``,
    ``port``, ``stored``, ``refused``); ``intake`` returns the current intake, or None while there is none."""

    def __init__(
        self,
        intake: Callable[[], IntakeLike | None],
        *,
        ae_title: str,
        port: int,
        allowed: list[AllowedPeer],
        host: str = "0.0.0.0",
        timeout_s: float = 30.0,
        max_associations: int = 16,
        log_format: str = "json",
        log_level: str = "info",
    ) -> None:
        self.intake = intake
        self.ae_title = ae_title
        self.port = port
        self.host = host
        self.allowed = allowed
        self.timeout_s = timeout_s
        self.max_associations = max_associations
        self.log_format = log_format
        self.log_level = log_level
        self.stored = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._folder: Path | None = None
        self._listener: Listener | None = None
        self._authkey = b""
        self._process: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self._process is not None and not self._stopping.is_set()

    def _config(self) -> NodeConfig:
        assert self._folder is not None
        return NodeConfig(
            ae_title=self.ae_title,
            port=self.port,
            host=self.host,
            allowed=[(p.ae_title, p.host, sorted(p.addresses)) for p in self.allowed],
            timeout_s=self.timeout_s,
            max_associations=self.max_associations,
            bridge=str(self._folder / "intake.sock"),
            authkey=self._authkey.hex(),
            log_format=self.log_format,
            log_level=self.log_level,
            spool=self._spool_root(),
        )

    def _spool_root(self) -> str | None:
        """The intake's spool folder when the intake is the service's (the child spools into it), else None."""
        intake = self.intake()
        return str(intake.spool.root) if isinstance(intake, Intake) else None

    def start(self) -> None:
        """Starts the child and waits until it listens.

        Raises:
            OSError: the child could not listen (its errno: ``EADDRINUSE`` for a port in use), or did not start.
        """
        self._stopping.clear()
        self._folder = Path(tempfile.mkdtemp(prefix="medserve-dimse-"))
        self._authkey = secrets.token_bytes(32)
        config = self._config()
        self._listener = Listener(config.bridge, family="AF_UNIX", authkey=self._authkey)
        bridge = threading.Thread(
            target=self._serve, args=(self._listener,), name="medserve-dimse-bridge", daemon=True
        )
        bridge.start()
        try:
            self._process = self._launch(config)
        except BaseException:
            self._close()
            raise
        watcher = threading.Thread(target=self._watch, name="medserve-dimse-watch", daemon=True)
        watcher.start()
        logger.info(
            "DICOM node %s listening on %s:%d in process %d (%d caller(s) allowed)",
            self.ae_title,
            self.host,
            self.port,
            self._process.pid,
            len(self.allowed),
        )

    def _launch(self, config: NodeConfig) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.pacs.dimse_node"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(dataclasses.asdict(config)) + "\n")
        process.stdin.flush()
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(START_TIMEOUT_S)
        line = first[0].strip() if first else ""
        word, _, rest = line.partition(" ")
        if word == "listening":
            self.port = int(rest)
            return process
        with contextlib.suppress(OSError):
            process.kill()
        process.wait()
        if word == "error":
            code, _, text = rest.partition(" ")
            raise OSError(int(code) if code.isdigit() else errno.EIO, text)
        raise OSError(errno.EIO, f"the DICOM node process did not start (exit code {process.returncode})")

    def _serve(self, listener: Listener) -> None:
        """Takes the child's connections (one per association thread), each served in a thread of its own."""
        while not self._stopping.is_set():
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):
                if self._stopping.is_set() or self._listener is not listener:
                    return  # stopped, or closed after a start that failed
                continue  # a failed handshake (wrong key): the next one
            thread = threading.Thread(
                target=self._serve_one, args=(conn,), name="medserve-dimse-store", daemon=True
            )
            thread.start()

    def _serve_one(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    return
                reply = answer_message(self.intake(), message)
                result = reply.get("result")
                with self._lock:
                    if result is not None and result["accepted"]:
                        self.stored += 1
                    else:
                        self.refused += 1
                try:
                    conn.send_bytes(json.dumps(reply).encode())
                except OSError:
                    return

    def _watch(self) -> None:
        """Starts the child again if it exits while the node should run."""
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            code = process.wait()
            if self._stopping.wait(RESTART_DELAY_S):
                return
            logger.error("the DICOM node process exited (code %s); starting it again", code)
            try:
                self._process = self._launch(self._config())
            except OSError as exc:
                logger.error("the DICOM node process cannot start again (%s); retrying", exc)

    def stop(self) -> None:
        """Stops the child (the end of its input; killed after ``STOP_TIMEOUT_S``) and the bridge."""
        if self._stopping.is_set() and self._process is None:
            return
        self._stopping.set()
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(OSError):
                if process.stdin is not None:
                    process.stdin.close()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
            logger.info("DICOM node %s stopped", self.ae_title)
        self._close()

    def _close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # Closing a listening socket does not wake a thread blocked in accept(): a handshake with a wrong key
            # does, and the bridge thread then sees its listener gone and ends.
            with contextlib.suppress(OSError, EOFError, AuthenticationError):
                Client(listener.address, family="AF_UNIX", authkey=b"wake").close()
            with contextlib.suppress(OSError):
                listener.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def dimse_server_from_settings(
    settings: Settings, intake: Callable[[], IntakeLike | None]
) -> DimseProcess | None:
    """The DICOM node of the settings (not started), or None when ``MEDSERVE_DIMSE_PORT`` is unset.

    Raises:
        SettingsError: a bad ``MEDSERVE_DIMSE_ALLOWED``.
    """
    if settings.dimse_port is None:
        return None
    allowed = parse_allowed(settings.dimse_allowed)
    if not allowed:
        logger.warning("%s is empty: every DICOM association will be rejected", env_name("dimse_allowed"))
    return DimseProcess(
        intake,
        ae_title=settings.dimse_ae_title,
        port=settings.dimse_port,
        host=settings.dimse_host,
        allowed=allowed,
        timeout_s=settings.delivery_timeout_s,
        log_format=settings.log_format,
        log_level=settings.log_level,
    )


# ---- the child's side ---------------------------------------------------------------------------------------------


class BridgedIntake:
    """The intake as the child sees it: each handler thread (one per association) has its own connection. With
    ``spool`` (the service's spool folder) the child checks and spools each instance itself."""

    def __init__(self, address: str, authkey: bytes, spool: Spool | None = None) -> None:
        self.address = address
        self.authkey = authkey
        self.spool = spool
        self._local = threading.local()

    def _connection(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Client(self.address, family="AF_UNIX", authkey=self.authkey)
        return conn

    def _ask(self, message: bytes) -> dict[str, Any]:
        try:
            conn = self._connection()
            conn.send_bytes(message)
            reply: dict[str, Any] = json.loads(conn.recv_bytes())
        except (OSError, EOFError) as exc:
            self._local.conn = None
            raise IntakeUnavailable(NOT_READY) from exc
        return reply

    def _refused(self, result: AcceptResult) -> dict[str, Any]:
        return self._ask(REFUSED + json.dumps(dataclasses.asdict(result)).encode())

    def _spool_and_ask(self, spool: Spool, data: bytes) -> dict[str, Any]:
        try:
            found = inspect_instance(data)
        except InstanceError as exc:
            return self._refused(AcceptResult(False, failure_reason=exc.status, detail=str(exc)))
        ids = not_yet_accepted(found)
        try:
            path, previous = spool.receive(found.sop_instance_uid, data)
        except SpoolFull as exc:
            failure = dataclasses.replace(
                ids, failure_reason=OUT_OF_RESOURCES, detail=exc.strerror or "spool full"
            )
            return self._refused(failure)
        except OSError as exc:
            logger.error("cannot spool an instance: %s", exc.strerror)
            failure = dataclasses.replace(
                ids, failure_reason=PROCESSING_FAILURE, detail="the spool cannot be written"
            )
            return self._refused(failure)
        spooled = SpooledInstance(found, str(path), len(data), previous)
        # A lost connection leaves the file: the service may have recorded it before it went.
        reply = self._ask(SPOOLED + json.dumps(spooled.to_json()).encode())
        if ("unavailable" in reply or "error" in reply) and previous is None:
            spool.delete_uncounted(path)  # not recorded: nothing names it
        return reply

    def accept_bytes(
        self, data: bytes, source: str, *, study_instance_uid: str | None = None
    ) -> AcceptResult:
        spool = self.spool
        reply = self._spool_and_ask(spool, data) if spool is not None else self._ask(BYTES + data)
        if "unavailable" in reply:
            raise IntakeUnavailable(str(reply["unavailable"]))
        if "error" in reply:
            raise RuntimeError(str(reply["error"]))
        return AcceptResult(**reply["result"])


def child_spool(folder: str | None) -> Spool | None:
    """The service's spool as the child writes into it; None (the bytes cross instead) without one, or when it
    cannot be opened."""
    if folder is None:
        return None
    try:
        return Spool(Path(folder), owner=False)
    except OSError as exc:
        logger.warning("the DICOM node cannot open the spool (%s); instances go to the service", exc.strerror)
        return None


def main() -> int:
    if not die_with_parent(os.getppid()):
        return 1
    config = NodeConfig(**json.loads(sys.stdin.readline()))
    from app.logs import configure_logging

    configure_logging(config.log_format, config.log_level)  # type: ignore[arg-type]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the service stops it (a Ctrl-C reaches the whole group)
    intake = BridgedIntake(config.bridge, bytes.fromhex(config.authkey), child_spool(config.spool))
    server = DimseServer(
        lambda: intake,
        ae_title=config.ae_title,
        port=config.port,
        allowed=config.peers(),
        host=config.host,
        timeout_s=config.timeout_s,
        max_associations=config.max_associations,
    )
    try:
        server.start()
    except OSError as exc:
        print(f"error {exc.errno or errno.EIO} {exc.strerror or exc}", flush=True)
        return 1
    print(f"listening {server.port}", flush=True)
    sys.stdin.read()  # until the service closes it, or dies
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
