"""serve/shadow/judge.py: what --shadow may name, the comparison by label, the window and the alert."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cskd.errors import CSKDError
from cskd.runtime.package import NamedPackage, read_package
from cskd.serve.settings import ServeSettings
from cskd.serve.shadow.judge import AgreementWindow, Sample, ShadowJudge, ShadowPair, class_map, resolve_shadow
from tests.test_serve_shadow import packages  # noqa: F401  the (student, teacher) packages of the trained run


class FixedTeacher:
    """A teacher that answers its class ``answer`` (an index into its own class list) for every image."""

    def __init__(self, package, answer: int) -> None:
        self.name, self.package, self.answer = "fixed", package, answer

    def infer(self, rows):
        logits = np.zeros((len(rows), len(self.package.classes)), np.float32)
        logits[:, self.answer] = 5.0
        return logits

    def status(self) -> dict:
        return {"where": "test", "reachable": True}


def entry(package, name="student") -> NamedPackage:
    return NamedPackage(name, Path("."), package)


def judge_for(student_package, teacher_package, answer: int, **settings) -> ShadowJudge:
    student, teacher = entry(student_package), entry(teacher_package, "teacher")
    pair = ShadowPair(student, teacher, class_map(student, teacher))
    return ShadowJudge(pair, FixedTeacher(teacher_package, answer), ServeSettings(model_dir="x", **settings))


def row_sample(package, student_class: int) -> Sample:
    spec = package.input
    logits = np.zeros(len(package.classes), np.float32)
    logits[student_class] = 3.0
    return Sample(np.zeros((spec.channels, spec.size, spec.size), np.float32), logits, 0.0)


def test_a_teacher_with_the_same_labels_in_another_order_is_compared_by_label(packages):  # noqa: F811
    student = read_package(packages[0])
    reordered = replace(student, classes=list(reversed(student.classes)))
    judge = judge_for(student, reordered, answer=0)  # the teacher's first class: the student's last label
    last = len(student.classes) - 1
    judge.judge([row_sample(student, last), row_sample(student, 0)])
    assert judge.counts["agree"] == 1 and judge.counts["disagree"] == 1
    assert list(judge.window.pairs) == [(last, last), (0, last)]  # teacher answers in the student's indices


def test_teachers_of_other_labels_are_refused_with_both_lists(packages):  # noqa: F811
    student = read_package(packages[0])
    other = replace(student, classes=[*student.classes[:-1], "kangaroo"])
    with pytest.raises(CSKDError, match="kangaroo.*the student.*"):
        class_map(entry(student), entry(other, "teacher"))
    with pytest.raises(CSKDError, match="different labels"):
        class_map(entry(student), entry(replace(student, classes=student.classes[:5]), "teacher"))


def test_the_window_keeps_the_last_pairs_and_their_confusion():
    window = AgreementWindow(4)
    for pair in [(0, 1), (1, 1), (2, 2), (0, 0), (1, 2)]:
        window.add(*pair)
    assert list(window.pairs) == [(1, 1), (2, 2), (0, 0), (1, 2)] and window.agreement == 0.75
    assert window.confusion(3) == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_an_agreement_hovering_at_the_threshold_warns_once_and_is_back_once_clearly_above(packages, caplog):  # noqa: F811
    package = read_package(packages[0])
    judge = judge_for(package, package, 0, shadow_window=100, shadow_alert=0.8)

    def feed(agree: bool) -> None:
        judge.window.add(0, 0 if agree else 1)
        judge.check_alert(judge.window.agreement)

    with caplog.at_level(logging.WARNING, logger="cskd.serve.shadow"):
        for i in range(99):
            feed(i % 5 != 0)  # 80% agree: a part-filled window is not judged
        assert not judge.alerting
        for agree in [False, True] * 40:  # hovering at 79-80%
            feed(agree)
        assert judge.alerting
        for _ in range(100):
            feed(True)  # clearly back
    messages = [r.getMessage() for r in caplog.records]
    assert sum("below the alert threshold" in m for m in messages) == 1 == judge.alerts
    assert sum("is back to" in m for m in messages) == 1 and not judge.alerting


def test_a_pairing_whose_inputs_cannot_be_converted_is_refused_with_the_reason(packages, tmp_path):  # noqa: F811
    student, teacher = packages
    served = [NamedPackage("s", student, read_package(student))]
    cropped = read_package(teacher)
    cropped = replace(cropped, input=replace(cropped.input, crop_pct=0.875))
    with pytest.raises(CSKDError, match="centre crop of 1 .* teacher's of 0.875"):
        resolve_shadow(ServeSettings(model_dir="x", shadow="t"), [*served, NamedPackage("t", teacher, cropped)])


def test_a_teacher_package_watched_is_warned_of(packages, caplog):  # noqa: F811
    student, teacher = packages
    served = [NamedPackage("t", teacher, read_package(teacher)), NamedPackage("s", student, read_package(student))]
    with caplog.at_level(logging.WARNING, logger="cskd.serve.shadow"):
        pair = resolve_shadow(ServeSettings(model_dir="x", shadow="s"), served)  # watches the first: the teacher
    assert pair.watched.name == "t" and any("is a teacher package" in r.getMessage() for r in caplog.records)
    with pytest.raises(CSKDError, match="no served model of that name.*t, s"):
        resolve_shadow(ServeSettings(model_dir="x", shadow="t", shadow_watch="nope"), served)
    with pytest.raises(CSKDError, match="holds 2 packages"):
        resolve_shadow(ServeSettings(model_dir="x", shadow=str(Path(student).parent)), served[1:])
