"""serve/shadow/capture.py: bounds that hold for every writer together; an image and its index line
together or not at all; the folder and its files for the server's user only."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat

import pytest

from cskd.serve.shadow import capture as capture_module
from cskd.serve.shadow.capture import DisagreementCapture

RECORD = {"time": 0.0, "student": {"top1": 1}, "teacher": {"top1": 2}}


def image(i: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + i.to_bytes(4, "big") * 64


def test_two_writers_on_one_folder_keep_one_bound_together(tmp_path):
    first, second = DisagreementCapture(tmp_path, 5, 1 << 20), DisagreementCapture(tmp_path, 5, 1 << 20)
    results = [(first if i % 2 else second).write(image(i), ".png", RECORD) for i in range(10)]
    assert results.count("written") == 5 and results[5:] == ["full"] * 5
    assert len(list(tmp_path.glob("*.png"))) == 5


def _write_many(folder: str, start: int) -> list:
    capture = DisagreementCapture(folder, 5, 1 << 20)
    return [capture.write(image(start + i), ".png", RECORD) for i in range(10)]


def test_writer_processes_racing_keep_the_bound_and_the_index_whole(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_write_many, [(str(tmp_path), 0), (str(tmp_path), 100)])
    written = sum(r.count("written") for r in results)
    lines = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert written == 5 == len(list(tmp_path.glob("*.png"))) == len(lines)
    assert {line["file"] for line in lines} == {p.name for p in tmp_path.glob("*.png")}


def test_the_byte_bound_counts_every_writers_files(tmp_path):
    first, second = DisagreementCapture(tmp_path, 100, 1024 + 300), DisagreementCapture(tmp_path, 100, 1024 + 300)
    blob = b"\x89PNG\r\n\x1a\n" + b"x" * 592  # 600 bytes
    assert [first.write(blob, ".png", RECORD), second.write(blob, ".png", RECORD), first.write(blob, ".png", RECORD)] == \
        ["written", "written", "full"]


def test_a_failed_image_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    capture = DisagreementCapture(tmp_path, 10, 1 << 20)

    def disk_full(path, data):
        with open(path, "wb") as partial:
            partial.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capture_module, "write_private", disk_full)
    assert [capture.write(image(i), ".png", RECORD) for i in range(3)] == ["failed"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [DisagreementCapture.LOCK]  # no .tmp, no image, no index


def test_an_image_whose_index_line_fails_is_removed_and_the_index_keeps_whole_lines(tmp_path, monkeypatch):
    capture = DisagreementCapture(tmp_path, 10, 1 << 20)
    assert capture.write(image(0), ".png", RECORD) == "written"
    real_write = os.write

    def short_index(descriptor, data):  # the index gets half a line, then the disk is full
        if bytes(data).startswith(b"{"):
            real_write(descriptor, bytes(data)[:7])
            raise OSError(28, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(os, "write", short_index)
    assert capture.write(image(1), ".png", RECORD) == "failed"
    monkeypatch.undo()
    lines = (tmp_path / "index.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["file"] == next(tmp_path.glob("*.png")).name
    assert len(list(tmp_path.glob("*.png"))) == 1 and capture.report()["images"] == 1


def test_the_folder_and_its_files_are_the_servers_users_only(tmp_path):
    folder = tmp_path / "new" / "captured"
    old = os.umask(0o022)  # the usual umask, under which files came out 0644 before
    try:
        capture = DisagreementCapture(folder, 10, 1 << 20)
        assert capture.write(image(0), ".png", RECORD) == "written"
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_refused_in_one_line(tmp_path):
    from cskd.errors import CSKDError

    tmp_path.chmod(0o500)
    with pytest.raises(CSKDError, match="cannot write there"):
        DisagreementCapture(tmp_path / "x", 10, 1 << 20)
