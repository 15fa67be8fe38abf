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


def certified_pair(packages, tmp_path, agreement: float, teacher_sha: str | None = None):  # noqa: F811
    """The student's package as a folder carrying robustness.json (clean agreement ``agreement`` %, against the
    teacher whose engine hash is ``teacher_sha``, the real teacher's by default)."""
    import json

    from cskd.files import file_sha256

    student_package, teacher_package = read_package(packages[0]), read_package(packages[1])
    sha = teacher_sha or file_sha256(packages[1] / teacher_package.engine)
    (tmp_path / "robustness.json").write_text(json.dumps({
        "clean": {"agreement_with_teacher": agreement, "images": 2000},
        "teacher": {"name": teacher_package.name, "engine_sha256": sha}}))
    student, teacher = NamedPackage("student", tmp_path, student_package), NamedPackage("teacher", packages[1], teacher_package)
    return ShadowPair(student, teacher, class_map(student, teacher))


def test_without_a_flag_the_alert_is_the_certified_agreement_less_three_standard_errors(packages, tmp_path):  # noqa: F811
    from cskd.serve.shadow.judge import alert_threshold

    pair = certified_pair(packages, tmp_path, 88.0)
    threshold, source = alert_threshold(ServeSettings(model_dir="x", shadow_window=500), pair)
    # by hand: 0.88 - 3 * sqrt(0.88 * 0.12 / 500) = 0.88 - 3 * 0.0145327 = 0.836402
    assert threshold == pytest.approx(0.836402, abs=1e-6)
    assert source["source"] == "robustness.json" and source["certified_agreement"] == pytest.approx(0.88)
    short, _ = alert_threshold(ServeSettings(model_dir="x", shadow_window=50), pair)
    assert short == pytest.approx(0.88 - 3 * (0.88 * 0.12 / 50) ** 0.5)  # a short window: further below, no flapping
    flagged, source = alert_threshold(ServeSettings(model_dir="x", shadow_alert=0.7), pair)
    assert flagged == 0.7 and source == {"source": "--shadow-alert"}


def test_no_alert_from_a_certificate_against_another_teacher_or_none_and_the_report_says_why(packages, tmp_path):  # noqa: F811
    from cskd.serve.shadow.judge import alert_threshold

    other, why = alert_threshold(ServeSettings(model_dir="x"), certified_pair(packages, tmp_path, 88.0, teacher_sha="0" * 64))
    assert other is None and "another teacher" in why["why"]
    (tmp_path / "robustness.json").unlink()
    pair = ShadowPair(NamedPackage("student", tmp_path, read_package(packages[0])), NamedPackage("teacher", packages[1],
                      read_package(packages[1])), list(range(10)))
    none, why = alert_threshold(ServeSettings(model_dir="x"), pair)
    assert none is None and "cskd bench" in why["why"]
    judge = ShadowJudge(pair, FixedTeacher(pair.teacher.package, 0), ServeSettings(model_dir="x"))
    assert judge.report(0, 0)["alert"]["threshold"] is None and "cskd bench" in judge.report(0, 0)["alert"]["why"]


def test_a_benched_package_alerts_by_default_when_served_with_its_teacher(packages, tmp_path):  # noqa: F811
    """cskd bench --no-shifts certifies the clean agreement; the shadow then alerts with no flag."""
    import shutil

    from cskd.measure.bench import BenchOptions, run_bench

    student = tmp_path / "student"
    shutil.copytree(packages[0], student)
    result = run_bench([student], packages[1], BenchOptions(batch_sizes=(1,), rounds=1, iters=1, warmup=0, eval_images=100,
                                                             out=tmp_path / "bench", shifts=None), log=lambda _: None)
    agreement = next(r["agreement_with_teacher"] for r in result["rows"] if r["role"] == "student") / 100
    student_entry = NamedPackage("student", student, read_package(student))
    teacher_entry = NamedPackage("teacher", packages[1], read_package(packages[1]))
    pair = ShadowPair(student_entry, teacher_entry, class_map(student_entry, teacher_entry))
    judge = ShadowJudge(pair, FixedTeacher(teacher_entry.package, 0), ServeSettings(model_dir="x", shadow_window=100))
    alert = judge.report(0, 0)["alert"]
    assert alert["source"] == "robustness.json"
    assert alert["threshold"] == pytest.approx(max(0.0, agreement - 3 * (agreement * (1 - agreement) / 100) ** 0.5))
