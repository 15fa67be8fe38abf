"""cskd.serve: the HTTP inference service for cskd model packages."""
