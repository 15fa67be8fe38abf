"""The shadow teacher end to end (serve/shadow/): agreement on live traffic equals the two packages' agreement
computed offline, for images and v2 tensors; one shadow process for every worker, at the lowest priority;
what it cannot keep up with is dropped and counted, bounded in bytes, without touching the student's answers;
it alerts, captures disagreements, and runs remotely with its own key, serving on while the remote is down."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cskd.errors import CSKDError
from cskd.export.exporter import ExportOptions, export_model
from cskd.measure.served import free_port
from cskd.runtime.backends import create_backend
from cskd.runtime.package import read_package
from cskd.runtime.preprocess import decode_image, to_engine_input
from cskd.serve.app import create_app, engine_threads
from tests.test_serve_app import metric_series, metric_value, val_png_files
from tests.test_serve_uvicorn import wait_ready


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


def post_all(client, blobs, path="/predict", key=None) -> list:
    answers = []
    headers = {"content-type": "image/png", **({"authorization": f"Bearer {key}"} if key else {})}
    for blob in blobs:
        response = client.post(path, content=blob, headers=headers)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def shadow_pid(app) -> int:
    return app.state.serving.shadow.report()["process"]["pid"]


def test_agreement_on_images_equals_the_packages_offline_agreement(packages, images):
    student, teacher = packages
    expected = offline_top1(student, images) == offline_top1(teacher, images)
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100)) as c:
        post_all(c, images)
        report = judged(c, len(images))
        metrics = c.get("/metrics").text
    assert report["samples"] == {"agree": int(expected.sum()), "disagree": int((~expected).sum()), "dropped": 0, "failed": 0}
    assert report["window"]["agreement"] == pytest.approx(expected.mean())
    confusion = np.array(report["confusion"]["counts"])
    assert confusion.sum() == len(images) and np.trace(confusion) == expected.sum()
    assert metric_value(metrics, "cskd_shadow_agreement") == pytest.approx(expected.mean())
    assert metric_value(metrics, "cskd_shadow_samples_total", outcome="agree") == expected.sum()
    assert metric_value(metrics, "cskd_shadow_teacher_probability_count") == len(images)


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


def test_a_stalled_shadow_drops_and_counts_while_the_student_answers_as_without_it(packages, images):
    student, teacher = packages
    with TestClient(create_app(student)) as plain:
        alone = post_all(plain, images)
    app = create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=2)
    with TestClient(app) as c:
        pid = shadow_pid(app)
        os.kill(pid, signal.SIGSTOP)  # the teacher gets no CPU at all
        try:
            watched = post_all(c, images)
        finally:
            os.kill(pid, signal.SIGCONT)
        report = judged(c, len(images))
    assert watched == alone  # the same answers, the shadow frozen or not
    assert report["samples"]["dropped"] > 0 and sum(report["samples"].values()) == len(images)


def noise_png(side: int, seed: int) -> bytes:
    """A valid image that PNG cannot compress: about side * side bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_what_waits_for_the_teacher_is_bounded_in_bytes_in_the_worker_and_in_the_shadow(packages):
    student, teacher = packages
    big = [noise_png(560, seed) for seed in range(24)]  # ~300 KiB each, 7 MiB in all
    bound = 1 << 20
    app = create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=1000, shadow_queue_bytes=bound)
    with TestClient(app) as c:
        feed = app.state.serving.shadow
        pid = shadow_pid(app)
        os.kill(pid, signal.SIGSTOP)
        try:
            buffered = []
            for blob in big:
                post_all(c, [blob])
                buffered.append(feed._transport.get_write_buffer_size())
        finally:
            os.kill(pid, signal.SIGCONT)
        assert max(buffered) <= feed.max_buffered == bound  # the worker holds at most its bound
        assert feed.dropped_here > 0
        seen = []
        deadline = time.time() + 300
        while time.time() < deadline:
            report = c.get("/v1/shadow").json()
            seen.append(report["queued_bytes"])
            if sum(report["samples"].values()) >= len(big):
                break
            time.sleep(0.02)
    assert max(seen) <= bound and report["queue_limit"] == {"images": 1000, "bytes": bound}
    assert sum(report["samples"].values()) == len(big) and report["samples"]["dropped"] >= feed.dropped_here


def test_disagreements_are_captured_for_the_servers_user_only_with_their_index(packages, images, tmp_path):
    from cskd.data.transfer import build_transfer_set

    student, teacher = packages
    folder = tmp_path / "captured"
    disagree = offline_top1(student, images) != offline_top1(teacher, images)
    assert disagree.any(), "the test needs images the two classify differently"
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100,
                               shadow_capture=str(folder), shadow_capture_max_images=3)) as c:
        post_all(c, images)
        report = judged(c, len(images))
    written = min(3, int(disagree.sum()))
    assert report["capture"]["images"] == written and report["capture"]["full"] == (disagree.sum() >= 3)
    lines = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert len(lines) == written
    sent = {bytes(b) for b, d in zip(images, disagree) if d}
    classes = read_package(student).classes
    for line in lines:  # the client's own bytes, and both answers
        assert (folder / line["file"]).read_bytes() in sent
        assert line["student"]["top1"] != line["teacher"]["top1"]
        assert line["teacher"]["label"] == classes[line["teacher"]["top1"]]
        assert line["teacher"]["package"]["name"] == read_package(teacher).name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}
    assert len(build_transfer_set(str(folder), channels=1)) == written  # what data.unlabeled reads


def test_the_alert_fires_once_when_agreement_falls_below_the_threshold(packages, images):
    student, teacher = packages
    agreement = (offline_top1(student, images) == offline_top1(teacher, images)).mean()
    with TestClient(create_app(student, shadow=str(teacher), shadow_rate=1.0, shadow_queue=100, shadow_window=10,
                               shadow_alert=min(1.0, agreement + 0.2))) as c:
        post_all(c, images)
        report = judged(c, len(images))
        metrics = c.get("/metrics").text
    assert report["alert"]["firing"] and report["alert"]["warnings"] >= 1
    assert metric_value(metrics, "cskd_shadow_alert_threshold", source="--shadow-alert") == pytest.approx(min(1.0, agreement + 0.2))
    assert report["alert"]["source"] == "--shadow-alert"


def test_the_teacher_can_run_on_another_server_over_grpc(packages, images):
    student, teacher = packages
    expected = offline_top1(student, images) == offline_top1(teacher, images)
    port = free_port()
    with TestClient(create_app(teacher, grpc_port=port)):  # the teacher's own server
        with TestClient(create_app(student, shadow=str(teacher), shadow_url=f"127.0.0.1:{port}", shadow_rate=1.0,
                                   shadow_queue=100)) as c:
            post_all(c, images)
            report = judged(c, len(images))
    assert report["remote"] == f"127.0.0.1:{port}" and report["samples"]["agree"] == expected.sum()
    assert report["teacher_status"]["reachable"]


def test_a_remote_teacher_that_is_down_at_start_is_counted_failed_until_it_answers(packages, images):
    student, teacher = packages
    port = free_port()
    with TestClient(create_app(student, shadow=str(teacher), shadow_url=f"127.0.0.1:{port}", shadow_rate=1.0,
                               shadow_queue=100)) as c:
        post_all(c, images[:4])  # the student serves though its watcher's teacher is away
        report = judged(c, 4)
        assert report["samples"]["failed"] == 4 and not report["teacher_status"]["reachable"]
        with TestClient(create_app(teacher, grpc_port=port)):  # the teacher's machine is back
            deadline = time.time() + 120
            while time.time() < deadline:
                post_all(c, images[:1])
                report = c.get("/v1/shadow").json()
                if report["samples"]["agree"] + report["samples"]["disagree"]:
                    break
                time.sleep(0.5)
    assert report["teacher_status"]["reachable"] and report["samples"]["agree"] + report["samples"]["disagree"] >= 1


def test_the_remote_gets_the_shadows_own_key_never_the_servers(packages, images):
    student, teacher = packages
    port = free_port()
    with TestClient(create_app(teacher, grpc_port=port, api_key="shared")):
        # the student server's own key is the teacher's too: before, it was sent; now the remote refuses the shadow
        with pytest.raises(CSKDError, match="--shadow-api-key"):
            with TestClient(create_app(student, api_key="shared", shadow=str(teacher), shadow_url=f"127.0.0.1:{port}")):
                pass
        with TestClient(create_app(student, api_key="mine", shadow=str(teacher), shadow_url=f"127.0.0.1:{port}",
                                   shadow_api_key="shared", shadow_rate=1.0)) as c:
            post_all(c, images[:4], key="mine")
            c.headers["authorization"] = "Bearer mine"
            report = judged(c, 4)
    assert report["samples"]["failed"] == 0 and report["samples"]["agree"] + report["samples"]["disagree"] == 4


def test_no_shadow_is_a_404_naming_the_option(packages):
    with TestClient(create_app(packages[0])) as c:
        response = c.get("/v1/shadow")
    assert response.status_code == 404 and "--shadow" in response.json()["message"]


def test_the_watched_model_cannot_watch_itself_and_another_can_be_named(packages, images, tmp_path):
    import shutil

    student, teacher = packages
    student_name, teacher_name = read_package(student).name, read_package(teacher).name
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    for shadow in (student_name, str(copy)):  # by its name, or the same engine under another folder
        with pytest.raises(CSKDError, match="the model it would watch"):
            with TestClient(create_app(student, shadow=shadow)):
                pass
    # the teacher served first: the student is named as the watched one
    with TestClient(create_app([teacher, student], shadow=teacher_name, shadow_watch=student_name, shadow_rate=1.0)) as c:
        post_all(c, images[:3], path=f"/predict?model={student_name}")
        post_all(c, images[:3])  # the teacher's own answers: not watched
        report = judged(c, 3)
    assert report["student"] == student_name and sum(report["samples"].values()) == 3


def test_a_teacher_named_name_equals_path_is_accepted_at_start_as_by_the_command(packages, images):
    student, teacher = packages
    with TestClient(create_app(student, shadow=f"t={teacher}", shadow_rate=1.0)) as c:
        post_all(c, images[:2])
        report = judged(c, 2)
    assert report["teacher"] == "t" and report["samples"]["failed"] == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_one_shadow_for_every_worker_all_its_threads_idle_and_reports_that_add_up(packages, images, tmp_path):
    student, teacher = packages
    port = free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "cskd", "serve", str(student), "--port", str(port), "--grpc-port", "0",
                             "--workers", "2", "--shadow", str(teacher), "--shadow-rate", "1", "--shadow-threads", "2",
                             "--shadow-queue", "100", "--log-level", "warning"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log, timeout_s=120)
        blobs = (images * 2)[:40]
        with httpx.Client(base_url=base, timeout=30) as client:  # a fresh connection each: both workers take some
            for blob in blobs:
                assert httpx.post(base + "/predict", content=blob, headers={"content-type": "image/png"}).status_code == 200
            deadline = time.time() + 300
            while time.time() < deadline and sum(client.get("/v1/shadow").json()["samples"].values()) < len(blobs):
                time.sleep(0.1)
            reports = [httpx.get(base + "/v1/shadow").json() for _ in range(8)]
            scrapes = [httpx.get(base + "/metrics").text for _ in range(8)]
        totals = [sum(r["samples"].values()) for r in reports]
        assert totals == [len(blobs)] * 8, totals  # every read answers for the one shadow: all 40
        assert {r["process"]["pid"] for r in reports} == {reports[0]["process"]["pid"]}
        for text in scrapes:
            assert sum(metric_series(text, "cskd_shadow_samples_total")) == len(blobs)
        pid = reports[0]["process"]["pid"]
        tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert len(tasks) >= 2 and {os.sched_getscheduler(t) for t in tasks} == {os.SCHED_IDLE}  # the teacher's pool too
        assert reports[0]["process"]["priority"] == "SCHED_IDLE"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert not os.path.exists(f"/proc/{pid}"), "the shadow process outlived its server"


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
    assert [(e.name, e.folder) for e in resolve_packages([f"x={student}"])] == [("x", student)]  # served under the name given


def test_a_name_that_is_not_one_path_segment_is_refused_as_no_route_could_reach_it(packages):
    from cskd.runtime.package import resolve_packages

    for name in ("team/int8", "..", "a b", "x?y"):
        with pytest.raises(CSKDError, match="not one path segment"):
            resolve_packages([f"{name}={packages[0]}"])
    assert resolve_packages([f"team-int8.v2={packages[0]}"])[0].name == "team-int8.v2"


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


def test_the_serve_command_refuses_a_shadow_it_cannot_run_in_one_line(packages, capsys):
    from cskd.cli import main

    student, teacher = packages
    assert main(["serve", str(student), "--shadow", "nowhere"]) != 0
    assert "neither a served model" in capsys.readouterr().err
