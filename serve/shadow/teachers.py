"""The shadow's teacher engine: in the shadow process (:class:`LocalTeacher`), or behind a KServe v2
gRPC endpoint (:class:`RemoteTeacher`: another ``cskd serve``, or Triton on a GPU machine)."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path
from typing import Optional, Protocol, Tuple

import numpy as np

from cskd.errors import CSKDError
from cskd.runtime.backends import BackendOptions, create_backend
from cskd.runtime.package import ModelPackage, NamedPackage

logger = logging.getLogger("cskd.serve.shadow")

RECONNECT_S = 5.0  # a remote that did not answer is asked again after this long, not on every batch


class TeacherEngine(Protocol):
    name: str
    package: ModelPackage

    def infer(self, rows: np.ndarray) -> np.ndarray:
        """Engine input of the teacher's spec -> logits ``[N, K]``; raises when the teacher cannot answer."""
        ...

    def status(self) -> dict:
        """What /v1/shadow says of the teacher: where it runs and whether it answers."""
        ...


class LocalTeacher:
    """The teacher's engine in this process, on ``threads`` threads (1: it runs in the calling thread)."""

    def __init__(self, entry: NamedPackage, threads: int) -> None:
        self.name, self.package = entry.name, entry.package
        self._backend, _ = create_backend(entry.folder, None, BackendOptions(threads=threads, spin=False))

    def infer(self, rows: np.ndarray) -> np.ndarray:
        return self._backend.infer(rows)

    def status(self) -> dict:
        return {"where": "local", "reachable": True}


def parse_remote(url: str) -> Tuple[str, bool]:
    """``--shadow-url`` -> (``host:port``, TLS?): ``grpcs://`` asks for TLS; ``grpc://`` or no scheme, plaintext."""
    for scheme, tls in (("grpcs://", True), ("grpc://", False)):
        if url.startswith(scheme):
            return url[len(scheme):], tls
    if "://" in url:
        raise CSKDError(f"--shadow-url {url}: the scheme is not grpc:// or grpcs://; give HOST:PORT, grpc://HOST:PORT "
                        "or grpcs://HOST:PORT (TLS)")
    return url, False


def is_loopback(target: str) -> bool:
    host = target.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteTeacher:
    """The teacher at ``url`` with its own ``api_key`` (never the student server's). A key goes to another
    host over TLS only (``grpcs://``). A remote that does not answer at the start is counted as failed until
    it does: the student serves meanwhile; a remote that answers and refuses (no such model, wrong key) is
    refused at the start, as a configuration to fix."""

    def __init__(self, entry: NamedPackage, url: str, api_key: Optional[str] = None, ca_file: Optional[str] = None,
                 timeout_s: float = 10.0) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        self.name, self.package, self.url, self._timeout = entry.name, entry.package, url, timeout_s
        target, tls = parse_remote(url)
        if api_key and not tls and not is_loopback(target):
            raise CSKDError(f"--shadow-url {url}: the shadow's API key would cross the network in clear text; use "
                            f"grpcs://{target} (TLS; --shadow-ca for a private CA) or a loopback address")
        self._grpc, self._pb2 = grpc, service_pb2
        # a remote that was down comes back within seconds, not gRPC's default backoff of up to two minutes
        options = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", int(RECONNECT_S * 1000))]
        if tls:
            roots = Path(ca_file).read_bytes() if ca_file else None
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
        self.reachable, self.error, self._checked = False, "not asked yet", 0.0
        self._check(at_start=True)

    def _check(self, at_start: bool = False) -> bool:
        """Ask the remote for the model's metadata: True once it answers; refusals are raised at the start."""
        grpc = self._grpc
        self._checked = time.monotonic()
        try:
            self._stub.ModelMetadata(self._pb2.ModelMetadataRequest(name=self.name), metadata=self._metadata,
                                     timeout=min(self._timeout, 5.0))
        except grpc.RpcError as exc:
            code = exc.code()
            self.reachable, self.error = False, f"{code.name}: {exc.details()}"
            refused = code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                               grpc.StatusCode.INVALID_ARGUMENT)
            if at_start and refused:
                hint = ("give the shadow its own key (--shadow-api-key; the server's --api-key never leaves it)"
                        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
                        else "serve the teacher there under this name (cskd serve TEACHER_PACKAGE, or Triton with the "
                             "exported repository), or name it NAME=PACKAGE in --shadow")
                raise CSKDError(f"the shadow teacher {self.name!r} at {self.url} refused ({self.error}); {hint}") from None
            if at_start:
                logger.warning("shadow teacher %s at %s does not answer (%s): serving without it until it does; its "
                               "samples count as failed", self.name, self.url, self.error)
            return False
        if not self.reachable and not at_start:
            logger.warning("shadow teacher %s at %s answers again", self.name, self.url)
        self.reachable, self.error = True, None
        return True

    def infer(self, rows: np.ndarray) -> np.ndarray:
        if not self.reachable and (time.monotonic() - self._checked < RECONNECT_S or not self._check()):
            raise ConnectionError(f"the remote teacher at {self.url} does not answer ({self.error})")
        request = self._pb2.ModelInferRequest(model_name=self.name)
        request.inputs.add(name=self.package.input.name, datatype="UINT8" if rows.dtype == np.uint8 else "FP32",
                           shape=list(rows.shape))
        request.outputs.add(name="logits")
        request.raw_input_contents.append(np.ascontiguousarray(rows).tobytes())
        try:
            response = self._stub.ModelInfer(request, metadata=self._metadata, timeout=self._timeout)
        except self._grpc.RpcError as exc:
            if exc.code() in (self._grpc.StatusCode.UNAVAILABLE, self._grpc.StatusCode.DEADLINE_EXCEEDED):
                self.reachable, self.error = False, f"{exc.code().name}: {exc.details()}"
            raise
        return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(len(rows), -1)

    def status(self) -> dict:
        return {"where": self.url, "reachable": self.reachable, "error": self.error}
