"""cskd.serve: the HTTP inference service for cskd model packages (``create_app`` builds it)."""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy: the shadow process (python -m cskd.serve.shadow.process) imports this package without the web stack.
    if name == "create_app":
        from cskd.serve.app import create_app

        return create_app
    raise AttributeError(name)
