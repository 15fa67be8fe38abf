"""The shadow teacher: agreement on live traffic equals the two packages' agreement computed offline, for
images and v2 tensors; it samples at its rate, drops (and counts) what it cannot keep up with without
touching the student's answers, alerts, captures disagreements as a transfer set, and runs remotely."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cskd.errors import CSKDError
from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.served import free_port
from cskd.runtime.backends import create_backend
from cskd.runtime.package import NamedPackage, read_package
from cskd.runtime.preprocess import decode_image, to_engine_input
from cskd.serve.app import create_app, engine_threads
from cskd.serve.metrics import create_metrics
from cskd.serve.settings import ServeSettings
from cskd.serve.shadow import AgreementWindow, ShadowTeacher, lower_this_threads_priority
from tests.test_serve_app import metric_value, val_png_files


@pytest.fixture(scope="module")
def packages(trained_run, tmp_path_factory):
    """(student package, its teacher's package): the trained run and the packaged demo teacher it learnt from."""
    out = tmp_path_factory.mktemp("shadow")
    student = out / "student"
    export_model(trained_run, ExportOptions(out=student, parity_images=100), log=lambda _: None)
    teacher = out / "teacher"
    export_model(trained_run, ExportOptions(out=teacher, teacher=True, parity_images=100), log=lambda _: None)
    return student, teacher


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """36 validation images as PNG bytes."""
    return [p.read_bytes() for p in val_png_files(tmp_path_factory.mktemp("val"), 36)]


def offline_top1(package_dir, blobs) -> np.ndarray:
    """Each image's top-1 by the package's engine, decoded the package's own way: the independent expectation."""
    backend, package = create_backend(package_dir)
    spec = package.input
    rows = to_engine_input(np.stack([decode_image(b, spec.channels, spec.size, spec.resize, crop_pct=spec.crop_pct)
                                     for b in blobs]), spec.dtype, spec.mean, spec.std)
    return backend.infer(rows).argmax(1)


def judged(client, count: int, timeout_s: float = 300.0) -> dict:
    """/v1/shadow once ``count`` samples have an outcome (and so nothing is queued or being judged). The teacher
    runs under SCHED_IDLE: on a machine busy with other work it waits for idle cycles, hence the long limit."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        report = client.get("/v1/shadow").json()
        if sum(report["samples"].values()) >= count:
            assert report["queued"] == 0
            return report
        time.sleep(0.05)
    raise AssertionError(f"only {report['samples']} after {timeout_s} s")


def test_agreement_on_images_equals_the_packages_offline_agreement(packages, images):
    student, teacher = packages
    expected = offline_top1(student, images) == offline_top1(teacher, images)
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100)) as c:
        for blob in images:
            assert c.post("/predict", content=blob, headers={"content-type": "image/png"}).status_code == 200
        report = judged(c, len(images))
        metrics = c.get("/metrics").text
    assert report["samples"] == {"agree": int(expected.sum()), "disagree": int((~expected).sum()), "dropped": 0, "failed": 0}
    assert report["window"]["agreement"] == pytest.approx(expected.mean())
    confusion = np.array(report["confusion"]["counts"])
    assert confusion.sum() == len(images) and np.trace(confusion) == expected.sum()
    assert metric_value(metrics, "cskd_shadow_agreement") == pytest.approx(expected.mean())
    assert metric_value(metrics, "cskd_shadow_samples_total", outcome="agree") == expected.sum()


def test_v2_tensors_reach_the_teacher_converted_to_its_own_input(packages, images):
    student, teacher = packages
    spec = read_package(student).input
    pixels = np.stack([decode_image(b, spec.channels, spec.size, spec.resize, crop_pct=spec.crop_pct) for b in images])
    rows = to_engine_input(pixels, spec.dtype, spec.mean, spec.std)
    expected = offline_top1(student, images) == offline_top1(teacher, images)
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100)) as c:
        name = c.get("/v1/model").json()["name"]
        for i in range(0, len(rows), 8):
            batch = rows[i : i + 8]
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape), "data": batch.ravel().tolist()}]}
            assert c.post(f"/v2/models/{name}/infer", json=body).status_code == 200
        report = judged(c, len(images))
    assert report["samples"]["agree"] == expected.sum() and report["samples"]["failed"] == 0


def test_a_slow_teacher_drops_samples_and_counts_them_while_the_student_answers_as_without_it(packages, images):
    student, teacher = packages
    app = create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=2)
    with TestClient(create_app(student)) as plain:
        alone = [plain.post("/predict", content=b, headers={"content-type": "image/png"}).json() for b in images]
    with TestClient(app) as c:
        real = app.state.serving.shadow.teacher.infer
        app.state.serving.shadow.teacher.infer = lambda rows: (time.sleep(0.2), real(rows))[1]
        watched = [c.post("/predict", content=b, headers={"content-type": "image/png"}).json() for b in images]
        report = judged(c, len(images))
        assert report["queued"] == 0  # every sample has its outcome: judged or dropped
    assert watched == alone  # the same answers, the shadow or not
    assert report["samples"]["dropped"] > 0 and sum(report["samples"].values()) == len(images)


def test_disagreements_are_captured_as_a_transfer_set_with_their_index(packages, images, tmp_path):
    import json

    from cskd.data.transfer import build_transfer_set

    student, teacher = packages
    folder = tmp_path / "captured"
    disagree = offline_top1(student, images) != offline_top1(teacher, images)
    assert disagree.any(), "the test needs images the two classify differently"
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100,
                               shadow_capture=str(folder), shadow_capture_max_images=3)) as c:
        for blob in images:
            c.post("/predict", content=blob, headers={"content-type": "image/png"})
        report = judged(c, len(images))
    written = min(3, int(disagree.sum()))
    assert report["capture"]["images"] == written and report["capture"]["full"] == (disagree.sum() >= 3)
    lines = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert len(lines) == written
    sent = {bytes(b) for b, d in zip(images, disagree) if d}
    for line in lines:  # the client's own bytes, and both answers
        assert (folder / line["file"]).read_bytes() in sent
        assert line["student"]["top1"] != line["teacher"]["top1"]
        assert line["teacher"]["package"]["name"] == read_package(teacher).name
    assert len(build_transfer_set(str(folder), channels=1)) == written  # what data.unlabeled reads


def test_the_alert_fires_once_when_agreement_falls_below_the_threshold(packages, images, caplog):
    student, teacher = packages
    agreement = (offline_top1(student, images) == offline_top1(teacher, images)).mean()
    with caplog.at_level(logging.WARNING, logger="cskd.serve.shadow"):
        with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100, shadow_window=10,
                                   shadow_alert=min(1.0, agreement + 0.2))) as c:
            for blob in images:
                c.post("/predict", content=blob, headers={"content-type": "image/png"})
            report = judged(c, len(images))
    warnings = [r.getMessage() for r in caplog.records if "below the alert threshold" in r.getMessage()]
    assert report["alert"]["firing"] and len(warnings) >= 1
    assert len(warnings) == 1 + sum("is back to" in r.getMessage() for r in caplog.records)  # once per crossing


def test_the_teacher_can_run_on_another_server_over_grpc(packages, images):
    student, teacher = packages
    expected = offline_top1(student, images) == offline_top1(teacher, images)
    port = free_port()
    with TestClient(create_app(teacher, grpc_port=port)):  # the teacher's own server
        with TestClient(create_app(student, shadow=str(teacher), shadow_url=f"127.0.0.1:{port}", shadow_rate=1.0,
                                   shadow_queue=100)) as c:
            for blob in images:
                c.post("/predict", content=blob, headers={"content-type": "image/png"})
            report = judged(c, len(images))
    assert report["remote"] == f"127.0.0.1:{port}" and report["samples"]["agree"] == expected.sum()


def test_a_remote_teacher_that_is_not_there_stops_the_server_with_a_clear_message(packages):
    student, teacher = packages
    with pytest.raises(CSKDError, match="is not served at"):
        with TestClient(create_app(student, shadow=str(teacher), shadow_url=f"127.0.0.1:{free_port()}")):
            pass


def test_no_shadow_is_a_404_naming_the_option(packages):
    with TestClient(create_app(packages[0])) as c:
        response = c.get("/v1/shadow")
    assert response.status_code == 404 and "--shadow" in response.json()["message"]


class FixedTeacher:
    """A teacher that answers class ``answer`` for every image."""

    def __init__(self, package, answer: int) -> None:
        self.name, self.package, self.answer = "fixed", package, answer

    def infer(self, rows):
        logits = np.zeros((len(rows), len(self.package.classes)), np.float32)
        logits[:, self.answer] = 5.0
        return logits


def shadow_for(package, rate: float, seed: int = 0, teacher=None, **settings) -> ShadowTeacher:
    student = SimpleNamespace(name="student", package=package)
    config = ServeSettings(model_dir="x", shadow_rate=rate, **settings)
    return ShadowTeacher(student, teacher or FixedTeacher(package, 0), config, create_metrics(), seed=seed)


def test_images_are_sampled_at_the_rate(packages):
    package = read_package(packages[0])
    shadow = shadow_for(package, rate=0.25, shadow_queue=10_000)
    logits = np.zeros((400, 10), np.float32)
    shadow.offer([b"x"] * 400, False, logits)
    sampled = shadow._queue.qsize()
    assert 400 * 0.25 - 4 * (400 * 0.25 * 0.75) ** 0.5 <= sampled <= 400 * 0.25 + 4 * (400 * 0.25 * 0.75) ** 0.5
    assert shadow_for(package, rate=0.0)._queue.qsize() == 0


def test_a_pairing_whose_inputs_cannot_be_converted_is_refused_with_the_reason(packages):
    package = read_package(packages[0])
    cropped = replace(package, input=replace(package.input, crop_pct=0.875))
    with pytest.raises(CSKDError, match="centre crop of 1 .* teacher's of 0.875"):
        shadow_for(package, rate=0.1, teacher=FixedTeacher(cropped, 0))
    fewer = replace(package, classes=package.classes[:5])
    with pytest.raises(CSKDError, match="5 classes"):
        shadow_for(package, rate=0.1, teacher=FixedTeacher(fewer, 0))


def test_the_window_keeps_the_last_pairs_and_their_confusion():
    window = AgreementWindow(4)
    for pair in [(0, 1), (1, 1), (2, 2), (0, 0), (1, 2)]:
        window.add(*pair)
    assert list(window.pairs) == [(1, 1), (2, 2), (0, 0), (1, 2)] and window.agreement == 0.75
    assert window.confusion(3) == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_several_models_each_under_its_name_with_their_own_metrics(packages, images, tmp_path):
    student, teacher = packages
    with TestClient(create_app([student, f"copy={student}", teacher])) as c:
        names = [m["name"] for m in c.get("/v1/models").json()]
        student_name, teacher_name = read_package(student).name, read_package(teacher).name
        assert names == [student_name, "copy", teacher_name]
        assert [m["name"] for m in c.post("/v2/repository/index").json()] == names
        by_default = c.post("/predict", content=images[0], headers={"content-type": "image/png"}).json()
        by_copy = c.post("/predict?model=copy", content=images[0], headers={"content-type": "image/png"}).json()
        by_teacher = c.post(f"/predict?model={teacher_name}", content=images[0], headers={"content-type": "image/png"}).json()
        assert by_default["model"] == student_name and by_copy["model"] == "copy" and by_teacher["model"] == teacher_name
        assert by_default["predictions"] == by_copy["predictions"]
        assert by_teacher["predictions"][0]["top"][0]["index"] == offline_top1(teacher, images[:1])[0]
        assert c.get(f"/v2/models/{teacher_name}/ready").status_code == 200
        unknown = c.post("/predict?model=nope", content=images[0], headers={"content-type": "image/png"})
        assert unknown.status_code == 404 and "copy" in unknown.json()["message"]
        metrics = c.get("/metrics").text
        assert metric_value(metrics, "cskd_images_total", model=student_name) == 1
        assert metric_value(metrics, "cskd_images_total", model="copy") == 1
        assert metric_value(metrics, "cskd_images_total", model=teacher_name) == 1


def test_a_folder_of_packages_is_served_whole_and_two_of_one_name_are_refused(packages, tmp_path):
    import shutil

    from cskd.runtime.package import resolve_packages

    student, teacher = packages
    repository = tmp_path / "repository"
    shutil.copytree(student, repository / "a")
    shutil.copytree(teacher, repository / "b")
    assert [e.name for e in resolve_packages([str(repository)])] == [read_package(student).name, read_package(teacher).name]
    with pytest.raises(CSKDError, match="NAME=PATH"):
        resolve_packages([str(student), str(repository / "a")])
    assert isinstance(resolve_packages([f"x={student}"])[0], NamedPackage)


def test_an_agreement_hovering_at_the_threshold_warns_once_and_is_back_once_clearly_above(packages, caplog):
    shadow = shadow_for(read_package(packages[0]), rate=1.0, shadow_window=100, shadow_alert=0.8)
    def feed(agree: bool) -> None:
        shadow.window.add(0, 0 if agree else 1)
        shadow._check_alert(shadow.window.agreement)

    with caplog.at_level(logging.WARNING, logger="cskd.serve.shadow"):
        for i in range(99):
            feed(i % 5 != 0)  # 80% agree: a part-filled window is not judged
        assert not shadow.alerting
        for agree in [False, True] * 40:  # hovering at 79-80%
            feed(agree)
        assert shadow.alerting
        for _ in range(100):
            feed(True)  # clearly back
    messages = [r.getMessage() for r in caplog.records]
    assert sum("below the alert threshold" in m for m in messages) == 1
    assert sum("is back to" in m for m in messages) == 1 and not shadow.alerting


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_teacher_thread_runs_under_sched_idle_and_leaves_the_others_as_they_were():
    seen = {}

    def teacher_thread():
        seen["applied"] = lower_this_threads_priority()
        seen["policy"] = os.sched_getscheduler(threading.get_native_id())  # what the kernel reports for this thread

    thread = threading.Thread(target=teacher_thread)
    thread.start()
    thread.join()
    assert seen == {"applied": "SCHED_IDLE", "policy": os.SCHED_IDLE}
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER  # the caller's thread untouched


@pytest.mark.parametrize("requested, models, cores, expected", [
    (None, 1, 2, None),  # one model: onnxruntime's default, every core
    (None, 2, 2, 1), (None, 3, 8, 2), (None, 4, 2, 1),  # several share the cores, one each at least
    (3, 2, 2, 3),  # --threads is what each gets
])
def test_several_models_share_the_cores_unless_threads_says_otherwise(monkeypatch, requested, models, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert engine_threads(requested, models) == expected


def test_each_served_model_gets_its_share_of_the_cores(packages, monkeypatch):
    import cskd.serve.app as app_module

    asked = []
    real = app_module.create_backend

    def recording(folder, backend=None, options=None):
        asked.append(options.threads)
        return real(folder, backend, options)

    monkeypatch.setattr(app_module, "create_backend", recording)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    with TestClient(create_app(list(packages))) as c:
        assert c.get("/readyz").status_code == 200
    assert asked == [2, 2]
