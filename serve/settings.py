"""Service settings: arguments of ``create_app`` / ``cskd serve``, or ``CSKD_SERVE_*`` environment variables."""

from __future__ import annotations

from typing import List, Optional

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSKD_SERVE_", protected_namespaces=())

    model_dir: str = Field("", description="model package folder (model.json + engine), or a folder of packages "
                           "(a Triton model repository); NAME=PATH serves it under NAME")
    model_dirs: List[str] = Field(default_factory=list, description="several packages (or folders of them), served "
                                  "each under its own name; the first answers /predict unless ?model= says otherwise")
    backend: Optional[str] = Field(None, description="onnxruntime | tensorrt | torch (default: the package's own)")
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    grpc_port: Optional[int] = Field(None, ge=0, le=65535, description="KServe v2 gRPC port beside HTTP (None or 0: no gRPC)")
    access_log: bool = Field(False, description="one log line per request (off: it costs CPU on every request)")
    workers: int = 1  # server processes (each loads the model)
    threads: Optional[int] = None  # onnxruntime intra-op threads of each model (None: see app.engine_threads)
    providers: Optional[List[str]] = Field(None, description="onnxruntime execution providers in order, e.g. "
                                           "CUDAExecutionProvider,CPUExecutionProvider (default: CUDA when available, else CPU)")
    max_batch: int = Field(32, ge=1, description="most images one inference runs together")
    # 0: a request runs as soon as the engine is free, and what arrives meanwhile forms the next batch
    # (Triton's default). A 2 ms window measured twice the latency at concurrency 1 and ~6% more
    # throughput at 16 on the demo student (docs/benchmarks.md).
    max_wait_ms: float = Field(0.0, ge=0, description="how long a batch waits to fill after its first image (0: never waits)")
    max_queue: int = Field(256, ge=1, description="images waiting at most; beyond, 503 with Retry-After")
    request_timeout_s: float = Field(10.0, gt=0, description="every request ends by then: still queued, 503; in a batch the "
                                     "backend has not returned, 504 (a longer call turns /readyz unready)")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images: int = Field(64, ge=1, description="images per request")
    max_pixels: int = Field(40_000_000, ge=1, description="pixels per decoded image (decompression bombs)")
    max_top_k: int = 100
    api_key: Optional[str] = Field(None, description="require 'Authorization: Bearer KEY' (health endpoints exempt)")
    cors_origins: List[str] = Field(default_factory=list, description="allowed CORS origins; none by default")
    # The shadow teacher (serve/shadow.py): a share of the student's requests also run through the teacher,
    # off the student's path, and their agreement is measured.
    shadow: Optional[str] = Field(None, description="the teacher that watches a served model: the name of a served "
                                  "model, a package folder (run by the shadow alone, not served to clients), or NAME=PACKAGE")
    shadow_watch: Optional[str] = Field(None, description="the served model the shadow watches (default: the first)")
    shadow_rate: float = Field(0.05, ge=0, le=1, description="share of the student's images the teacher also classifies")
    shadow_alert: Optional[float] = Field(None, ge=0, le=1, description="log a warning when the window's agreement falls "
                                          "below this")
    shadow_window: int = Field(1000, ge=10, description="samples the agreement is computed over")
    shadow_queue: int = Field(64, ge=1, description="sampled images waiting for the teacher at most; more are dropped "
                              "and counted")
    shadow_queue_bytes: int = Field(32 << 20, ge=1 << 20, description="bytes of sampled images waiting for the teacher at "
                                    "most (and as much again in flight from the workers); more are dropped and counted")
    shadow_threads: int = Field(1, ge=1, description="CPU threads of the shadow teacher (its process runs at the lowest "
                                "priority)")
    shadow_url: Optional[str] = Field(None, description="run the shadow teacher on a remote KServe v2 gRPC endpoint "
                                      "(HOST:PORT or grpc://HOST:PORT plaintext, grpcs://HOST:PORT TLS; another cskd serve "
                                      "or Triton) instead of here")
    shadow_api_key: Optional[str] = Field(None, description="the remote teacher's own API key (the server's api_key is "
                                          "never sent); over TLS only, unless the remote is loopback")
    shadow_ca: Optional[str] = Field(None, description="PEM file of the CA that signed the remote teacher's TLS certificate "
                                     "(default: the system's roots)")
    shadow_capture: Optional[str] = Field(None, description="write every disagreeing input as an image into this folder "
                                          "(with index.jsonl; mode 0700, files 0600): the next round's transfer set; off by default")
    shadow_capture_max_images: int = Field(10_000, ge=1)
    shadow_capture_max_bytes: int = Field(1 << 30, ge=1024)
    # set by `cskd serve` for its workers: the socket of the one shadow process it started (serve/shadow/process.py)
    shadow_socket: Optional[str] = None

    @field_validator("shadow", mode="before")
    @classmethod
    def _shadow_off(cls, value: Optional[str]) -> Optional[str]:
        """``off``, ``none`` or empty turn the shadow teacher off (what a compose file's variable can say)."""
        return None if value is None or str(value).strip().lower() in ("", "off", "none") else value

    @property
    def packages(self) -> List[str]:
        """Every package reference given, in order (``model_dir`` first)."""
        return [*([self.model_dir] if self.model_dir else []), *self.model_dirs]

    @model_validator(mode="after")
    def _grpc_port_is_its_own(self) -> "ServeSettings":
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"grpc_port={self.grpc_port} is the HTTP port too; give gRPC its own port (or 0 for none)")
        return self

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> "ServeSettings":
        if self.max_queue < self.max_images:
            raise ValueError(f"max_queue={self.max_queue} is below max_images={self.max_images}: a request of "
                             f"{self.max_images} images could never be queued; raise max_queue or lower max_images")
        return self
