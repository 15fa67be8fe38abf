"""The shadow teacher: the served student watched by its teacher on live traffic.

After the student has answered, a sampled share of its images (``--shadow-rate``) is offered to the
teacher. Offering costs the request one random draw and, when sampled, a put into a bounded queue:
the teacher's work happens in its own thread, at the lowest CPU priority and on one core by default
(an onnxruntime session of one thread runs in the calling thread, so the whole teacher inherits the
priority), so it never delays a student answer; when it cannot keep up, the queue is full and
samples are dropped and counted, never queued without bound. The teacher sees the input it expects:
its own decoding of the original image for ``/predict``, or, for v2 tensors, the student's tensor
turned back into pixels and encoded the teacher's way (:func:`~cskd.runtime.preprocess.convert_engine_input`).

What it measures: top-1 agreement over a sliding window of samples, the samples by outcome (agree,
disagree, dropped, failed), the teacher's probability of the student's answer, the student-against-
teacher confusion by class; a warning in the log when the agreement falls below ``--shadow-alert``.
With ``--shadow-capture DIR`` every disagreeing input is written as an image, with a line in
``DIR/index.jsonl``, bounded in count and bytes: a folder ``data.unlabeled`` reads, for the next
round of distillation, which the teacher alone labels.

The teacher may also run elsewhere (``--shadow-url HOST:PORT``: another ``cskd serve``, or Triton on
a GPU machine) over KServe v2 gRPC; its package folder still says its name and input spec.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Protocol, Tuple, Union

import numpy as np
from PIL import Image

from cskd.errors import CSKDError
from cskd.runtime.backends import BackendOptions, create_backend
from cskd.runtime.package import InputSpec, ModelPackage, NamedPackage
from cskd.runtime.postprocess import softmax
from cskd.runtime.preprocess import ImageDecodeError, conversion_problem, convert_engine_input, decode_image, to_engine_input, to_pixels
from cskd.serve.metrics import ServeMetrics
from cskd.serve.settings import ServeSettings
from cskd.serve.state import ServedModel

logger = logging.getLogger("cskd.serve.shadow")

LOWEST_NICE = 19  # where SCHED_IDLE is refused: the teacher thread's nice value
TEACHER_BATCH = 8  # samples the teacher classifies in one call when several wait


class TeacherEngine(Protocol):
    name: str
    package: ModelPackage

    def infer(self, rows: np.ndarray) -> np.ndarray:
        """Engine input of the teacher's spec -> logits ``[N, K]``."""
        ...


class LocalTeacher:
    """The teacher's engine in this process, on ``threads`` threads (1: it runs in the calling thread)."""

    def __init__(self, entry: NamedPackage, threads: int) -> None:
        self.name, self.package = entry.name, entry.package
        self._backend, _ = create_backend(entry.folder, None, BackendOptions(threads=threads, spin=False))

    def infer(self, rows: np.ndarray) -> np.ndarray:
        return self._backend.infer(rows)


class RemoteTeacher:
    """The teacher behind a KServe v2 gRPC endpoint (``host:port``): another cskd serve, or Triton."""

    def __init__(self, entry: NamedPackage, url: str, api_key: Optional[str] = None, timeout_s: float = 10.0) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.name, self.package, self._timeout = entry.name, entry.package, timeout_s
        self._pb2 = service_pb2
        self._channel = grpc.insecure_channel(url.removeprefix("grpc://"))
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        try:
            self._stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=self.name), metadata=self._metadata, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise CSKDError(f"the shadow teacher {self.name!r} is not served at {url} ({exc.code().name}: {exc.details()}); "
                            "start it there (cskd serve TEACHER_PACKAGE, or Triton with the exported repository) or fix "
                            "--shadow-url") from None

    def infer(self, rows: np.ndarray) -> np.ndarray:
        request = self._pb2.ModelInferRequest(model_name=self.name)
        request.inputs.add(name=self.package.input.name, datatype="UINT8" if rows.dtype == np.uint8 else "FP32",
                           shape=list(rows.shape))
        request.outputs.add(name="logits")
        request.raw_input_contents.append(np.ascontiguousarray(rows).tobytes())
        response = self._stub.ModelInfer(request, metadata=self._metadata, timeout=self._timeout)
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(rows), -1)


@dataclass
class Sample:
    """One sampled image: its encoded bytes (/predict) or its engine-ready row (v2), and the student's logits."""

    payload: Union[bytes, np.ndarray]
    student_logits: np.ndarray
    received: float  # wall-clock time, for the capture's index


class AgreementWindow:
    """The last ``size`` (student top-1, teacher top-1) pairs: agreement and confusion over them."""

    def __init__(self, size: int) -> None:
        self.pairs: Deque[Tuple[int, int]] = deque(maxlen=size)

    def add(self, student: int, teacher: int) -> None:
        self.pairs.append((student, teacher))

    @property
    def agreement(self) -> Optional[float]:
        return sum(s == t for s, t in self.pairs) / len(self.pairs) if self.pairs else None

    def confusion(self, classes: int) -> List[List[int]]:
        """``[student class][teacher class]`` counts."""
        counts = np.zeros((classes, classes), dtype=np.int64)
        for s, t in self.pairs:
            counts[s, t] += 1
        return counts.tolist()


class DisagreementCapture:
    """Disagreeing inputs as image files in ``folder`` (any image reader, and ``data.unlabeled``, takes them)
    with one JSON line each in ``folder/index.jsonl``; at most ``max_images`` files and ``max_bytes`` in all,
    counting what an earlier run of the server left there. Files are written to a temporary name and
    renamed; several server processes share the folder (names carry the process id)."""

    INDEX = "index.jsonl"

    def __init__(self, folder: str | Path, max_images: int, max_bytes: int) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CSKDError(f"--shadow-capture {folder}: cannot write there ({exc.strerror}); choose a writable folder") from None
        self.max_images, self.max_bytes = max_images, max_bytes
        existing = [p for p in self.folder.iterdir() if p.is_file() and p.suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp")]
        self.images, self.bytes = len(existing), sum(p.stat().st_size for p in existing)
        self._sequence = 0

    @property
    def full(self) -> bool:
        return self.images >= self.max_images or self.bytes >= self.max_bytes

    def write(self, image: bytes, suffix: str, record: Dict[str, Any]) -> str:
        """Store one image and its index line: ``"written"``, ``"full"`` (a bound is reached) or ``"failed"``."""
        if self.full or self.bytes + len(image) > self.max_bytes:
            return "full"
        self._sequence += 1
        name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(record['time']))}-{os.getpid()}-{self._sequence:06d}{suffix}"
        try:
            temporary = self.folder / f".{name}.tmp"
            temporary.write_bytes(image)
            temporary.rename(self.folder / name)
            with open(self.folder / self.INDEX, "a") as index:  # one short append per line: whole lines, several writers
                index.write(json.dumps({**record, "file": name}, separators=(",", ":")) + "\n")
        except OSError as exc:
            logger.warning("shadow capture: cannot write %s (%s)", name, exc.strerror)
            return "failed"
        self.images += 1
        self.bytes += len(image)
        return "written"

    def report(self) -> Dict[str, Any]:
        return {"folder": str(self.folder), "images": self.images, "bytes": self.bytes, "max_images": self.max_images,
                "max_bytes": self.max_bytes, "full": self.full}


def lower_this_threads_priority() -> str:
    """Put the calling thread under every other: Linux's SCHED_IDLE policy (a runnable thread of any
    other policy preempts it at once on waking, where nice 19 still gets a share and a slice), else
    nice 19, else nothing (other systems). Returns what was applied."""
    tid = threading.get_native_id()
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    if sys.platform.startswith("linux"):  # a thread's own nice value only on Linux
        try:
            os.setpriority(os.PRIO_PROCESS, tid, LOWEST_NICE)
            return f"nice {LOWEST_NICE}"
        except OSError:
            pass
    return "unchanged"


def image_file(payload: Union[bytes, np.ndarray], spec: InputSpec) -> Tuple[bytes, str]:
    """A sample as an image file: the client's own bytes when they are a PNG or JPEG, else a PNG of the
    pixels (a v2 tensor is turned back into pixels with the student's mean and std)."""
    if isinstance(payload, bytes):
        if payload[:8] == b"\x89PNG\r\n\x1a\n":
            return payload, ".png"
        if payload[:3] == b"\xff\xd8\xff":
            return payload, ".jpg"
        with Image.open(io.BytesIO(payload)) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue(), ".png"
    pixels = to_pixels(payload[None], spec.dtype, spec.mean, spec.std)[0]
    image = Image.fromarray(pixels[0], mode="L") if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def package_identity(package: ModelPackage) -> Dict[str, Any]:
    return {"name": package.name, "precision": package.precision, "sha256": package.source.get("sha256")}


class ShadowTeacher:
    """Samples the ``student``'s answers for the ``teacher`` and keeps the comparison (see the module)."""

    def __init__(self, student: ServedModel, teacher: TeacherEngine, settings: ServeSettings, metrics: ServeMetrics,
                 capture: Optional[DisagreementCapture] = None, seed: Optional[int] = None) -> None:
        problem = conversion_problem(student.package.input, teacher.package.input)
        if problem:
            raise CSKDError(f"the shadow teacher {teacher.name!r} cannot watch {student.name!r}: {problem}; pair the "
                            "student with a teacher exported from its own run (cskd export RUN --teacher)")
        if len(teacher.package.classes) != len(student.package.classes):
            raise CSKDError(f"the shadow teacher {teacher.name!r} has {len(teacher.package.classes)} classes and the student "
                            f"{student.name!r} {len(student.package.classes)}; pair models of the same classes")
        self.student, self.teacher, self.settings, self.capture = student, teacher, settings, capture
        self.rate, self.alert = settings.shadow_rate, settings.shadow_alert
        self.window = AgreementWindow(settings.shadow_window)
        self._queue: "queue.Queue[Optional[Sample]]" = queue.Queue(maxsize=settings.shadow_queue)
        self._random = random.Random(seed)
        self._lock = threading.Lock()  # the window and the counts: written by the teacher's thread, read by /v1/shadow
        self.counts = {"agree": 0, "disagree": 0, "dropped": 0, "failed": 0}
        self.teacher_prob_sum = 0.0
        self.alerting = False
        labels = (student.name, teacher.name)
        self._agreement = metrics.shadow_agreement.labels(*labels)
        self._window_size = metrics.shadow_window.labels(*labels)
        self._samples = {outcome: metrics.shadow_samples.labels(*labels, outcome) for outcome in self.counts}
        self._teacher_prob = metrics.shadow_teacher_prob.labels(*labels)
        self._queued = metrics.shadow_queue.labels(*labels)
        self._captured = {result: metrics.shadow_captured.labels(*labels, result) for result in ("written", "full", "failed")}
        if self.alert is not None:
            metrics.shadow_alert_threshold.labels(*labels).set(self.alert)
        self._thread: Optional[threading.Thread] = None
        self._outstanding = 0  # samples queued or being judged: offered, outcome not recorded yet

    # --- on the event loop: the student's path -------------------------------------------------------

    def offer(self, payload: Union[List[bytes], np.ndarray], rows: bool, logits: np.ndarray) -> None:
        """The student answered ``payload`` (encoded images, or engine rows when ``rows``) with ``logits``:
        sample each image with probability ``rate``; a sample the queue cannot take is dropped and counted."""
        for i in range(len(logits)):
            if self._random.random() >= self.rate:
                continue
            with self._lock:  # counted before the put: the teacher's thread may judge it at once
                self._outstanding += 1
            try:
                self._queue.put_nowait(Sample(np.array(payload[i]) if rows else payload[i], logits[i], time.time()))
            except queue.Full:
                self._count("dropped")
        self._queued.set(self._queue.qsize())

    # --- in the teacher's thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cskd-shadow-teacher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop after the samples already queued (within ``timeout_s``; the thread is a daemon)."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _run(self) -> None:
        lower_this_threads_priority()
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < TEACHER_BATCH:
                try:
                    sample = self._queue.get_nowait()
                except queue.Empty:
                    break
                if sample is None:
                    self._judge(batch)
                    return
                batch.append(sample)
            self._queued.set(self._queue.qsize())
            self._judge(batch)

    def _teacher_rows(self, sample: Sample) -> np.ndarray:
        spec = self.teacher.package.input
        if isinstance(sample.payload, bytes):
            image = decode_image(sample.payload, spec.channels, spec.size, spec.resize, self.settings.max_pixels, spec.crop_pct)
            return to_engine_input(image[None], spec.dtype, spec.mean, spec.std)[0]
        return convert_engine_input(sample.payload[None], self.student.package.input, spec)[0]

    def _judge(self, batch: List[Sample]) -> None:
        """Run the teacher on ``batch`` and record each sample's outcome; nothing here may raise."""
        ready: List[Tuple[Sample, np.ndarray]] = []
        for sample in batch:
            try:
                if not np.isfinite(sample.student_logits).all():
                    raise ValueError("the student's logits are not finite")
                ready.append((sample, self._teacher_rows(sample)))
            except (ImageDecodeError, ValueError, OSError) as exc:
                logger.debug("shadow sample failed: %s", exc)
                self._count("failed")
        if not ready:
            return
        try:
            teacher_logits = np.asarray(self.teacher.infer(np.stack([rows for _, rows in ready])), dtype=np.float32)
            if teacher_logits.shape != (len(ready), len(self.teacher.package.classes)):
                raise ValueError(f"the teacher answered {teacher_logits.shape}")
        except Exception as exc:  # a failing or unreachable teacher: counted, logged once in a while, never raised
            logger.warning("shadow teacher %s failed on %d samples: %s", self.teacher.name, len(ready), exc)
            for _ in ready:
                self._count("failed")
            return
        teacher_probs = softmax(teacher_logits.astype(np.float64))
        for (sample, _), probs in zip(ready, teacher_probs):
            self._record(sample, probs)

    def _record(self, sample: Sample, teacher_probs: np.ndarray) -> None:
        student_top1, teacher_top1 = int(np.argmax(sample.student_logits)), int(np.argmax(teacher_probs))
        agree = student_top1 == teacher_top1
        prob_of_student = float(teacher_probs[student_top1])
        with self._lock:
            self.window.add(student_top1, teacher_top1)
            self.teacher_prob_sum += prob_of_student
            agreement = self.window.agreement
        self._count("agree" if agree else "disagree")
        self._teacher_prob.observe(prob_of_student)
        self._agreement.set(agreement)
        self._window_size.set(len(self.window.pairs))
        self._check_alert(agreement)
        if not agree and self.capture is not None:
            self._capture(sample, student_top1, teacher_top1, teacher_probs)

    def _check_alert(self, agreement: float) -> None:
        """Warn once when the window's agreement falls below the threshold, and once when it is clearly back.

        Judged on a full window only: a part-filled one is a noisier estimate than the one the threshold
        was chosen for. Back means two standard errors of that estimate above the threshold, so that an
        agreement that hovers at the threshold does not warn at every sample (it did, before)."""
        samples = len(self.window.pairs)
        if self.alert is None or samples < self.settings.shadow_window:
            return
        rearm = self.alert + 2 * (self.alert * (1 - self.alert) / samples) ** 0.5
        if agreement < self.alert and not self.alerting:
            self.alerting = True
            logger.warning("shadow teacher: %s agrees with its teacher %s on %.1f%% of the last %d sampled images, below the "
                           "alert threshold of %.1f%%: the traffic may have drifted from the training data (GET /v1/shadow "
                           "has the confusion by class)", self.student.name, self.teacher.name, 100 * agreement,
                           len(self.window.pairs), 100 * self.alert)
        elif agreement >= rearm and self.alerting:
            self.alerting = False
            logger.warning("shadow teacher: agreement of %s with %s is back to %.1f%% (threshold %.1f%%)", self.student.name,
                           self.teacher.name, 100 * agreement, 100 * self.alert)

    def _capture(self, sample: Sample, student_top1: int, teacher_top1: int, teacher_probs: np.ndarray) -> None:
        classes = self.student.package.classes
        student_probs = softmax(sample.student_logits[None].astype(np.float64))[0]
        record = {"time": sample.received, "source": "image" if isinstance(sample.payload, bytes) else "tensor",
                  "student": {"top1": student_top1, "label": classes[student_top1], "probability": float(student_probs[student_top1]),
                              "package": package_identity(self.student.package)},
                  "teacher": {"top1": teacher_top1, "label": classes[teacher_top1], "probability": float(teacher_probs[teacher_top1]),
                              "package": package_identity(self.teacher.package)}}
        try:
            image, suffix = image_file(sample.payload, self.student.package.input)
            result = self.capture.write(image, suffix, record)
        except Exception as exc:  # never let a capture failure reach anything else
            logger.warning("shadow capture failed: %s", exc)
            result = "failed"
        self._captured[result].inc()

    def _count(self, outcome: str) -> None:
        """One sample's outcome: each sample offered gets exactly one (dropped when the queue was full)."""
        with self._lock:
            self.counts[outcome] += 1
            self._outstanding -= 1
        self._samples[outcome].inc()

    # --- GET /v1/shadow ------------------------------------------------------------------------------

    def report(self) -> Dict[str, Any]:
        with self._lock:
            agreement, samples = self.window.agreement, len(self.window.pairs)
            confusion = self.window.confusion(len(self.student.package.classes))
            counts, judged = dict(self.counts), self.counts["agree"] + self.counts["disagree"]
            outstanding = self._outstanding
            mean_prob = self.teacher_prob_sum / judged if judged else None
        return {
            "student": self.student.name, "teacher": self.teacher.name, "rate": self.rate,
            "remote": self.settings.shadow_url,
            "window": {"size": self.settings.shadow_window, "samples": samples, "agreement": agreement},
            "alert": {"threshold": self.alert, "firing": self.alerting},
            # waiting for the teacher or being judged by it: 0 means every sample offered so far has its outcome
            "samples": counts, "queued": outstanding, "queue_limit": self.settings.shadow_queue,
            "teacher_probability_of_student_top1": {"mean": mean_prob},
            "classes": list(self.student.package.classes),
            "confusion": {"rows": "student top-1", "columns": "teacher top-1", "counts": confusion},
            "capture": self.capture.report() if self.capture else None,
        }


def create_shadow(student: ServedModel, entry: NamedPackage, settings: ServeSettings, metrics: ServeMetrics) -> ShadowTeacher:
    """The shadow teacher ``entry`` for ``student``, here or at ``settings.shadow_url``, capturing if asked."""
    teacher: TeacherEngine = (RemoteTeacher(entry, settings.shadow_url, settings.api_key) if settings.shadow_url
                              else LocalTeacher(entry, settings.shadow_threads))
    capture = (DisagreementCapture(settings.shadow_capture, settings.shadow_capture_max_images, settings.shadow_capture_max_bytes)
               if settings.shadow_capture else None)
    return ShadowTeacher(student, teacher, settings, metrics, capture)
