"""cskd.serve: the HTTP inference service for cskd model packages (``create_app`` builds it)."""

from cskd.serve.app import create_app

__all__ = ["create_app"]
