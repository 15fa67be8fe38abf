"""serve/shadow/teachers.py: the remote teacher's address, TLS, and its key policy."""

from __future__ import annotations

import pytest

from cskd.errors import CSKDError
from cskd.runtime.package import NamedPackage, read_package
from cskd.serve.shadow.teachers import RemoteTeacher, is_loopback, parse_remote
from tests.test_serve_shadow import packages  # noqa: F401


def test_remote_addresses_say_whether_they_ask_for_tls():
    assert parse_remote("10.0.0.5:8001") == ("10.0.0.5:8001", False)
    assert parse_remote("grpc://teacher:8001") == ("teacher:8001", False)
    assert parse_remote("grpcs://teacher.example:443") == ("teacher.example:443", True)
    with pytest.raises(CSKDError, match="grpcs://"):
        parse_remote("http://teacher:8001")
    assert is_loopback("127.0.0.1:8001") and is_loopback("localhost:1") and is_loopback("[::1]:8001")
    assert not is_loopback("10.0.0.5:8001") and not is_loopback("teacher:8001")


def test_a_key_is_never_sent_in_clear_to_another_host(packages):  # noqa: F811
    teacher = NamedPackage("t", packages[1], read_package(packages[1]))
    for url in ("10.0.0.5:8001", "grpc://teacher:8001"):
        with pytest.raises(CSKDError, match="in clear text"):
            RemoteTeacher(teacher, url, api_key="secret")
