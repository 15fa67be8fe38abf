"""What the shadow measures: which model it watches and with which teacher (one function decides what
``--shadow`` may name), how the two compare (by label), and the comparison over a sliding window."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from cskd.errors import CSKDError
from cskd.files import file_sha256
from cskd.runtime.package import ROBUSTNESS_JSON, ModelPackage, NamedPackage, resolve_packages
from cskd.runtime.postprocess import softmax
from cskd.runtime.preprocess import ImageDecodeError, conversion_problem, convert_engine_input, image_rows
from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.capture import DisagreementCapture, image_file
from cskd.serve.shadow.teachers import TeacherEngine

logger = logging.getLogger("cskd.serve.shadow")

TEACHER_BATCH = 16  # samples the teacher classifies in one call at most
OUTCOMES = ("agree", "disagree", "dropped", "failed")
CAPTURE_RESULTS = ("written", "full", "failed")
FAILURE_LOG_S = 60.0
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class ShadowPair:
    """The served model the shadow watches, its teacher, and the teacher's class index -> the student's."""

    watched: NamedPackage
    teacher: NamedPackage
    class_map: List[int]


def class_map(student: NamedPackage, teacher: NamedPackage) -> List[int]:
    """Each teacher class's index among the student's classes: they are compared by label, in whatever order
    each package lists them; packages of different label sets are refused with both lists."""
    ours, theirs = list(student.package.classes), list(teacher.package.classes)
    if sorted(ours) != sorted(theirs) or len(set(ours)) != len(ours):
        raise CSKDError(f"the shadow teacher {teacher.name!r} and {student.name!r} classify different labels: the teacher "
                        f"{theirs}, the student {ours}; pair models trained on the same classes")
    return [ours.index(label) for label in theirs]


def resolve_shadow(settings: ServeSettings, served: Sequence[NamedPackage]) -> ShadowPair:
    """What ``--shadow`` (and ``--shadow-watch``) name, checked: the one rule for the command's pre-check and the
    shadow process. The teacher is a served model's name, a package folder, or ``NAME=PACKAGE`` (NAME: the model's
    name at ``--shadow-url``); it may not be the watched model itself."""
    by_name = {entry.name: entry for entry in served}
    if settings.shadow_watch and settings.shadow_watch not in by_name:
        raise CSKDError(f"--shadow-watch {settings.shadow_watch}: no served model of that name; this server serves "
                        f"{', '.join(by_name)}")
    watched = by_name[settings.shadow_watch] if settings.shadow_watch else served[0]
    reference = str(settings.shadow)
    if reference in by_name:
        teacher = by_name[reference]
    else:
        path = reference.partition("=")[2] if "=" in reference and not Path(reference).exists() else reference
        if not Path(path).exists():
            raise CSKDError(f"--shadow {reference}: neither a served model ({', '.join(by_name)}) nor a package folder; "
                            "pass the teacher's package (cskd export RUN --teacher), NAME=PACKAGE, or the name of one "
                            "served here")
        found = resolve_packages([reference])
        if len(found) != 1:
            raise CSKDError(f"--shadow {reference} holds {len(found)} packages ({', '.join(e.name for e in found)}); "
                            "name the teacher's own package folder")
        teacher = found[0]
    def engine(entry: NamedPackage) -> str:
        return file_sha256(entry.folder / entry.package.engine)

    if teacher is watched or engine(teacher) == engine(watched):  # by its name, or its engine elsewhere
        raise CSKDError(f"--shadow {reference} is {watched.name!r}, the model it would watch: it would agree with itself "
                        f"on every image and never alert; name the teacher's package, or watch another model with "
                        f"--shadow-watch NAME")
    if watched.package.role == "teacher":
        logger.warning("shadow: the watched model %s is a teacher package (role 'teacher'); --shadow-watch NAME watches "
                       "a student", watched.name)
    problem = conversion_problem(watched.package.input, teacher.package.input)
    if problem:
        raise CSKDError(f"the shadow teacher {teacher.name!r} cannot watch {watched.name!r}: {problem}; pair the "
                        "student with a teacher exported from its own run (cskd export RUN --teacher)")
    return ShadowPair(watched, teacher, class_map(watched, teacher))


@dataclass
class Sample:
    """One sampled image: its encoded bytes (/predict) or its engine-ready row (v2), and the student's logits."""

    payload: Union[bytes, np.ndarray]
    student_logits: np.ndarray
    received: float  # wall-clock time, for the capture's index

    @property
    def size(self) -> int:
        return len(self.payload) if isinstance(self.payload, bytes) else self.payload.nbytes


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


ALERT_STANDARD_ERRORS = 3.0  # below the certified agreement by this many standard errors of a window: an alert


def alert_threshold(settings: ServeSettings, pair: ShadowPair) -> Tuple[Optional[float], Dict[str, Any]]:
    """The agreement under which the shadow warns, and where it came from.

    ``--shadow-alert`` when given. Otherwise the watched package's certified clean agreement with this
    very teacher (``robustness.json``, written by ``cskd bench``; the teacher's engine hash must match)
    less three standard errors of a full window, the reference-window rule of drift monitors: a window of
    500 at 88% has a standard error of 1.5 points, so a fixed "a few points under" would fire on noise
    for short windows and late for long ones. None (no alert) when the package was never certified
    against this teacher, and the reason says so."""
    if settings.shadow_alert is not None:
        return settings.shadow_alert, {"source": "--shadow-alert"}
    record_path = pair.watched.folder / ROBUSTNESS_JSON
    try:
        record = json.loads(record_path.read_text())
        agreement = float(record["clean"]["agreement_with_teacher"]) / 100.0
        certified_teacher = record["teacher"]["engine_sha256"]
    except FileNotFoundError:
        return None, {"source": None, "why": f"no --shadow-alert, and {pair.watched.name} carries no certified agreement "
                                             f"({ROBUSTNESS_JSON}): run cskd bench on it against this teacher"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, {"source": None, "why": f"{record_path} is unreadable ({exc}); rerun cskd bench on the package"}
    if certified_teacher != file_sha256(pair.teacher.folder / pair.teacher.package.engine):
        return None, {"source": None, "why": f"{pair.watched.name} was certified against another teacher "
                                             f"({record['teacher'].get('name')}) than {pair.teacher.name}"}
    window = settings.shadow_window
    threshold = max(0.0, agreement - ALERT_STANDARD_ERRORS * (agreement * (1 - agreement) / window) ** 0.5)
    return threshold, {"source": ROBUSTNESS_JSON, "certified_agreement": agreement,
                       "certified_images": record["clean"].get("images"), "standard_errors": ALERT_STANDARD_ERRORS,
                       "window": window}


def package_identity(package: ModelPackage) -> Dict[str, Any]:
    return {"name": package.name, "precision": package.precision, "sha256": package.source.get("sha256")}


class ShadowJudge:
    """The teacher's verdict on the watched student's samples: the window, outcome counts, alert and capture.
    Thread-safe: samples are judged in one thread, counted and reported from others."""

    def __init__(self, pair: ShadowPair, teacher: TeacherEngine, settings: ServeSettings,
                 capture: Optional[DisagreementCapture] = None) -> None:
        self.student, self.teacher, self.settings, self.capture = pair.watched, teacher, settings, capture
        self._class_map = np.asarray(pair.class_map)
        self.alert, self.alert_source = alert_threshold(settings, pair)
        self.window = AgreementWindow(settings.shadow_window)
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self.captured = dict.fromkeys(CAPTURE_RESULTS, 0)
        self.probability_buckets = [0] * (len(PROBABILITY_BUCKETS) + 1)  # the last: above every bound
        self.teacher_prob_sum = 0.0
        self.alerting, self.alerts = False, 0
        self.received = 0  # samples that reached the shadow: each gets one outcome
        self._warned: Dict[str, float] = {}

    def count(self, outcome: str, samples: int = 1) -> None:
        with self._lock:
            self.counts[outcome] += samples

    def arrived(self) -> None:
        with self._lock:
            self.received += 1

    def teacher_rows(self, sample: Sample) -> np.ndarray:
        spec = self.teacher.package.input
        if isinstance(sample.payload, bytes):
            return image_rows([sample.payload], spec, self.settings.max_pixels)[0]
        return convert_engine_input(sample.payload[None], self.student.package.input, spec)[0]

    def judge(self, batch: List[Sample]) -> None:
        """Run the teacher on ``batch`` and record each sample's outcome; nothing here may raise."""
        ready: List[Tuple[Sample, np.ndarray]] = []
        for sample in batch:
            try:
                if not np.isfinite(sample.student_logits).all():
                    raise ValueError("the student's logits are not finite")
                ready.append((sample, self.teacher_rows(sample)))
            except (ImageDecodeError, ValueError, OSError) as exc:
                logger.debug("shadow sample failed: %s", exc)
                self.count("failed")
        if not ready:
            return
        try:
            teacher_logits = np.asarray(self.teacher.infer(np.stack([rows for _, rows in ready])), dtype=np.float32)
            if teacher_logits.shape != (len(ready), len(self.teacher.package.classes)):
                raise ValueError(f"the teacher answered {teacher_logits.shape}")
        except Exception as exc:  # a failing or unreachable teacher: counted and logged, never raised
            self._warn_failure(exc, len(ready))
            self.count("failed", len(ready))
            return
        # the teacher's probabilities in the student's class order: compared by label
        teacher_probs = np.zeros_like(teacher_logits, dtype=np.float64)
        teacher_probs[:, self._class_map] = softmax(teacher_logits.astype(np.float64))
        for (sample, _), probs in zip(ready, teacher_probs):
            self._record(sample, probs)

    def _warn_failure(self, exc: Exception, samples: int) -> None:
        """One log line per kind of failure a minute: a teacher that is down fails every batch."""
        now, key = time.monotonic(), type(exc).__name__
        if now - self._warned.get(key, -FAILURE_LOG_S) >= FAILURE_LOG_S:
            self._warned[key] = now
            logger.warning("shadow teacher %s failed on %d samples: %s (counted as failed; said once a minute)",
                           self.teacher.name, samples, exc)

    def _record(self, sample: Sample, teacher_probs: np.ndarray) -> None:
        student_top1, teacher_top1 = int(np.argmax(sample.student_logits)), int(np.argmax(teacher_probs))
        agree = student_top1 == teacher_top1
        prob_of_student = float(teacher_probs[student_top1])
        with self._lock:
            self.window.add(student_top1, teacher_top1)
            self.teacher_prob_sum += prob_of_student
            self.probability_buckets[int(np.searchsorted(PROBABILITY_BUCKETS, prob_of_student, side="left"))] += 1
            self.counts["agree" if agree else "disagree"] += 1
            agreement = self.window.agreement
        self.check_alert(agreement)
        if not agree and self.capture is not None:
            self._capture(sample, student_top1, teacher_top1, teacher_probs)

    def check_alert(self, agreement: float) -> None:
        """Warn once when the window's agreement falls below the threshold, and once when it is clearly back.

        Judged on a full window only: a part-filled one is a noisier estimate than the one the threshold
        was chosen for. Back means two standard errors of that estimate above the threshold, so that an
        agreement that hovers at the threshold does not warn at every sample (it did, before)."""
        samples = len(self.window.pairs)
        if self.alert is None or samples < self.settings.shadow_window:
            return
        rearm = self.alert + 2 * (self.alert * (1 - self.alert) / samples) ** 0.5
        if agreement < self.alert and not self.alerting:
            self.alerting, self.alerts = True, self.alerts + 1
            logger.warning("shadow teacher: %s agrees with its teacher %s on %.1f%% of the last %d sampled images, below the "
                           "alert threshold of %.1f%%: the traffic may have drifted from the training data (GET /v1/shadow "
                           "has the confusion by class)", self.student.name, self.teacher.name, 100 * agreement,
                           samples, 100 * self.alert)
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
        with self._lock:
            self.captured[result] += 1

    def report(self, queued: int, queued_bytes: int) -> Dict[str, Any]:
        """``GET /v1/shadow``'s answer (the workers add the samples they dropped before sending)."""
        settings = self.settings
        with self._lock:
            agreement, samples = self.window.agreement, len(self.window.pairs)
            confusion = self.window.confusion(len(self.student.package.classes))
            counts, judged = dict(self.counts), self.counts["agree"] + self.counts["disagree"]
            mean_prob = self.teacher_prob_sum / judged if judged else None
            histogram = {"buckets": list(PROBABILITY_BUCKETS), "counts": list(self.probability_buckets),
                         "sum": self.teacher_prob_sum}
            captured = dict(self.captured)
        return {
            "student": self.student.name, "teacher": self.teacher.name, "rate": settings.shadow_rate,
            "remote": settings.shadow_url, "teacher_status": self.teacher.status(),
            "window": {"size": settings.shadow_window, "samples": samples, "agreement": agreement},
            "alert": {"threshold": self.alert, "firing": self.alerting, "warnings": self.alerts, **self.alert_source},
            # waiting for the teacher or being judged by it: 0 means every sample offered so far has its outcome
            "samples": counts, "queued": queued, "queued_bytes": queued_bytes,
            "queue_limit": {"images": settings.shadow_queue, "bytes": settings.shadow_queue_bytes},
            "teacher_probability_of_student_top1": {"mean": mean_prob, "histogram": histogram},
            "classes": list(self.student.package.classes),
            "confusion": {"rows": "student top-1", "columns": "teacher top-1 (by label)", "counts": confusion},
            "capture": {**self.capture.report(), "results": captured} if self.capture else None,
        }
