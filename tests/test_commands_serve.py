"""cskd/commands/serve.py: what the command line and the environment make of the server's settings."""

from __future__ import annotations

from cskd.cli import parse_args
from cskd.commands.serve import settings_from_args


def test_packages_on_the_command_line_replace_the_environments(monkeypatch):
    # the serving image bakes CSKD_SERVE_MODEL_DIR=/models/model; `docker run IMAGE /models/new` must serve /models/new alone
    monkeypatch.setenv("CSKD_SERVE_MODEL_DIR", "/models/model")
    settings, given = settings_from_args(parse_args(["serve", "/models/new", "--shadow", "/models/teacher"]))
    assert settings.packages == ["/models/new"] and given["model_dir"] == ""
    settings, _ = settings_from_args(parse_args(["serve"]))  # nothing given: the environment's package
    assert settings.packages == ["/models/model"]


def test_the_shadows_own_settings_reach_the_server(monkeypatch):
    monkeypatch.delenv("CSKD_SERVE_MODEL_DIR", raising=False)
    args = parse_args(["serve", "a", "b", "--shadow", "t", "--shadow-watch", "b", "--shadow-url", "grpcs://h:443",
                       "--shadow-api-key", "k", "--shadow-ca", "ca.pem", "--shadow-queue-bytes", "2097152"])
    settings, _ = settings_from_args(args)
    assert (settings.shadow_watch, settings.shadow_url, settings.shadow_api_key, settings.shadow_ca,
            settings.shadow_queue_bytes, settings.api_key) == ("b", "grpcs://h:443", "k", "ca.pem", 2097152, None)
