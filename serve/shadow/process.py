"""The shadow process: the one home of the shadow teacher, for every worker of a server.

``cskd serve`` (or, for an app made by ``create_app`` alone, its lifespan) starts it once; every worker
connects to its Unix socket and sends the samples it draws, fire and forget; the process judges them
with the teacher, keeps the one window, counts, alert and capture, and pushes its report to every
worker, which answers ``GET /v1/shadow`` and the ``cskd_shadow_*`` metrics from the latest one at once.

The whole process runs under Linux's SCHED_IDLE policy (every thread: the teacher's onnxruntime pool
is created after the policy is set and inherits it), so it only ever gets cycles nothing else wants;
being a process of its own, it holds no lock or GIL a worker waits for. When it cannot keep up, its
queue (bounded in images and in bytes) is full and samples are dropped and counted. It exits when
its parent does.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, List, Optional

import numpy as np

from cskd.errors import CSKDError
from cskd.runtime.package import NamedPackage, read_package
from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.capture import DisagreementCapture
from cskd.serve.shadow.judge import TEACHER_BATCH, Sample, ShadowJudge, resolve_shadow
from cskd.serve.shadow.teachers import LocalTeacher, RemoteTeacher, TeacherEngine
from cskd.serve.shadow.wire import FrameError, FrameReader, encode_frame

logger = logging.getLogger("cskd.serve.shadow")

SPEC_VARIABLE = "CSKD_SHADOW_SPEC"  # what the process is to watch, as JSON (settings without the server's key)
LOWEST_NICE = 19  # where SCHED_IDLE is refused
PUSH_S = 0.1  # the report goes to the workers this often when it changed (and every second regardless)
READY_TIMEOUT_S = 120.0
# The teacher waits this long for a full batch: one pass over its weights for many samples, not one each,
# so that it evicts the student's weights and activations from the caches less often.
BATCH_LINGER_S = 0.5


def lower_process_priority() -> str:
    """Put every thread of this process under every other process's: SCHED_IDLE (a runnable thread of any other
    policy preempts it at once), else nice 19; threads created afterwards inherit it. Returns what was applied."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    if hasattr(os, "SCHED_IDLE"):
        try:
            for tid in tasks:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    try:
        for tid in tasks:
            os.setpriority(os.PRIO_PROCESS, tid, LOWEST_NICE)
        return f"nice {LOWEST_NICE}"
    except OSError:
        return "unchanged"


def spec_for(settings: ServeSettings, served: List[NamedPackage], socket_path: str) -> str:
    fields = settings.model_dump(mode="json", exclude={"api_key"})  # the server's key never reaches the shadow
    return json.dumps({"settings": fields, "served": [[e.name, str(e.folder)] for e in served], "socket": socket_path})


class SampleQueue:
    """Samples waiting for the teacher: at most ``images`` and ``max_bytes`` of payload."""

    def __init__(self, images: int, max_bytes: int) -> None:
        self.images, self.max_bytes = images, max_bytes
        self._items: Deque[Sample] = deque()
        self.bytes = 0
        self.judging = 0  # taken by the teacher, outcome not recorded yet
        self._ready = threading.Condition()
        self.closed = False

    def put(self, sample: Sample) -> bool:
        with self._ready:
            if len(self._items) >= self.images or self.bytes + sample.size > self.max_bytes:
                return False
            self._items.append(sample)
            self.bytes += sample.size
            self._ready.notify()
            return True

    def take(self, most: int, linger_s: float = 0.0) -> List[Sample]:
        """Up to ``most`` samples, waiting for the first and then up to ``linger_s`` for ``most``; empty once
        closed and drained."""
        with self._ready:
            while not self._items and not self.closed:
                self._ready.wait()
            deadline = time.monotonic() + linger_s
            while len(self._items) < most and not self.closed and time.monotonic() < deadline:
                self._ready.wait(deadline - time.monotonic())
            batch = [self._items.popleft() for _ in range(min(most, len(self._items)))]
            self.bytes -= sum(s.size for s in batch)
            self.judging = len(batch)
            return batch

    def done(self) -> None:
        with self._ready:
            self.judging = 0

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    @property
    def waiting(self) -> int:
        with self._ready:
            return len(self._items) + self.judging


def decode_sample(header: dict, payload: bytes) -> Sample:
    logits = np.asarray(header["logits"], dtype=np.float32)
    if header["kind"] == "image":
        return Sample(payload, logits, header["time"])
    row = np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])
    return Sample(row, logits, header["time"])


class ShadowServer:
    """The socket the workers connect to, the queue, and the loop that judges."""

    def __init__(self, judge: ShadowJudge, settings: ServeSettings, socket_path: str) -> None:
        self.judge, self.settings = judge, settings
        self.queue = SampleQueue(settings.shadow_queue, settings.shadow_queue_bytes)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_path)
        os.chmod(socket_path, 0o600)
        self._listener.listen(64)
        self._workers: List[_Worker] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def serve(self) -> None:
        threading.Thread(target=self._accept, name="shadow-accept", daemon=True).start()
        threading.Thread(target=self._push, name="shadow-report", daemon=True).start()
        while True:
            batch = self.queue.take(TEACHER_BATCH, BATCH_LINGER_S)
            if not batch:
                break
            self.judge.judge(batch)
            self.queue.done()
        self._send_report()  # the last word: every sample's outcome
        time.sleep(0.2)  # for the senders to deliver it before the process ends

    def stop(self) -> None:
        """Judge what is queued, then return from :meth:`serve`."""
        self._stopping.set()
        self.queue.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            worker = _Worker(connection)
            with self._lock:
                self._workers.append(worker)
            worker.post(self._report_frame())
            threading.Thread(target=self._read, args=(worker,), name="shadow-read", daemon=True).start()

    def _read(self, worker: "_Worker") -> None:
        reader = FrameReader()
        try:
            while True:
                data = worker.connection.recv(1 << 20)
                if not data:
                    break
                for header, payload in reader.feed(data):
                    self._receive(header, payload)
        except (OSError, FrameError) as exc:
            logger.warning("shadow: a worker's connection failed (%s)", exc)
        finally:
            with self._lock:
                if worker in self._workers:
                    self._workers.remove(worker)
            worker.close()

    def _receive(self, header: dict, payload: bytes) -> None:
        if header.get("dropped"):
            self.judge.count("dropped", int(header["dropped"]))
        if header.get("t") != "sample":
            return
        self.judge.arrived()
        try:
            sample = decode_sample(header, payload)
        except (KeyError, ValueError, TypeError):
            self.judge.count("failed")
            return
        if self._stopping.is_set() or not self.queue.put(sample):
            self.judge.count("dropped")

    def _report_frame(self) -> bytes:
        report = self.judge.report(self.queue.waiting, self.queue.bytes)
        report["process"] = {"pid": os.getpid(), "priority": PRIORITY}
        return encode_frame({"t": "report", "report": report})

    def _send_report(self) -> None:
        frame = self._report_frame()
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.post(frame)

    def _push(self) -> None:
        parent, last, last_sent = os.getppid(), None, 0.0
        while not self._stopping.is_set():
            time.sleep(PUSH_S)
            if os.getppid() != parent:  # the server is gone: so is its shadow
                logger.warning("shadow: the server exited; stopping")
                self.stop()
                return
            state = (dict(self.judge.counts), self.judge.received, self.queue.waiting, self.judge.alerting,
                     getattr(self.judge.teacher, "reachable", True))
            if state != last or time.monotonic() - last_sent > 1.0:
                self._send_report()
                last, last_sent = state, time.monotonic()


PRIORITY = "unchanged"


class _Worker:
    """One worker's connection: its reports are sent by a thread of its own, the latest replacing an unsent one,
    so a worker that does not read (its event loop busy) delays no other worker's report and queues nothing."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self._latest: Optional[bytes] = None
        self._ready = threading.Condition()
        self._open = True
        threading.Thread(target=self._send, name="shadow-send", daemon=True).start()

    def post(self, frame: bytes) -> None:
        with self._ready:
            self._latest = frame
            self._ready.notify()

    def _send(self) -> None:
        while True:
            with self._ready:
                while self._latest is None and self._open:
                    self._ready.wait()
                if not self._open:
                    return
                frame, self._latest = self._latest, None
            try:
                self.connection.sendall(frame)
            except OSError:
                return  # the reader notices the closed connection

    def close(self) -> None:
        with self._ready:
            self._open = False
            self._ready.notify()
        self.connection.close()


def _build(spec: dict) -> ShadowServer:
    settings = ServeSettings(**spec["settings"])
    served = [NamedPackage(name, Path(folder), read_package(folder)) for name, folder in spec["served"]]
    pair = resolve_shadow(settings, served)
    teacher: TeacherEngine = (RemoteTeacher(pair.teacher, settings.shadow_url, settings.shadow_api_key, settings.shadow_ca)
                              if settings.shadow_url else LocalTeacher(pair.teacher, settings.shadow_threads))
    capture = (DisagreementCapture(settings.shadow_capture, settings.shadow_capture_max_images, settings.shadow_capture_max_bytes)
               if settings.shadow_capture else None)
    return ShadowServer(ShadowJudge(pair, teacher, settings, capture), settings, spec["socket"])


def main() -> int:
    """The process's life: lower its priority, build the judge, say ``ready`` (or ``error: ...``) on stdout, serve."""
    global PRIORITY
    PRIORITY = lower_process_priority()  # before onnxruntime makes its threads: they inherit the policy
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s", stream=sys.stderr)
    try:
        server = _build(json.loads(os.environ[SPEC_VARIABLE]))
    except CSKDError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us in order
    print("ready", flush=True)
    server.serve()
    return 0


@dataclass
class ShadowProcess:
    """The running shadow process, as its starter holds it."""

    process: subprocess.Popen
    socket: str
    folder: str

    @classmethod
    def start(cls, settings: ServeSettings, served: List[NamedPackage], ready_timeout_s: float = READY_TIMEOUT_S) -> "ShadowProcess":
        """Start it and wait until it listens: a configuration it refuses is raised here in one line."""
        folder = tempfile.mkdtemp(prefix="cskd-shadow-")  # 0700: the socket is the server's user's only
        path = os.path.join(folder, "shadow.sock")
        env = {**os.environ, SPEC_VARIABLE: spec_for(settings, served, path), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        env.pop("CSKD_SERVE_API_KEY", None)
        process = subprocess.Popen([sys.executable, "-m", "cskd.serve.shadow.process"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, env=env, text=True)
        handle = cls(process, path, folder)
        ready, _, _ = select.select([process.stdout], [], [], ready_timeout_s)
        line = process.stdout.readline().strip() if ready else ""
        if line == "ready":
            return handle
        if line.startswith("error: "):
            handle.stop()
            raise CSKDError(line.removeprefix("error: "))
        if process.poll() is not None:
            handle.stop()
            raise CSKDError(f"the shadow process exited (code {process.returncode}) before it was ready; its log is above")
        logger.warning("shadow: not ready after %.0f s (a busy machine gives it no time: it runs at the lowest priority); "
                       "serving meanwhile, the workers connect when it listens", ready_timeout_s)
        return handle

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let it judge what it has queued (within ``timeout_s``), then end it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
