"""The ``torch`` backend: run a package's source checkpoint in PyTorch (development and debugging).

It needs the training stack (torch, timm) and the checkpoint on this machine, so it lives with the
commands and is registered only when a command is asked for ``--backend torch``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cskd.errors import CSKDError
from cskd.models.deploy import DeployModule
from cskd.runtime.backends import Backend, BackendOptions, register_backend
from cskd.runtime.package import ModelPackage
from cskd.tasks import load_trained


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: Path, uint8_input: bool) -> None:
        trained = load_trained(checkpoint)
        self.module = DeployModule(trained.deployable(), trained.spec.mean, trained.spec.std, uint8_input, False).eval()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch)).float().numpy()


@register_backend("torch")
def torch_backend(folder: Path, package: ModelPackage, options: BackendOptions) -> Backend:
    checkpoint = package.source.get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_file():
        raise CSKDError(f"the torch backend needs the source checkpoint {checkpoint!r}, which is not on this machine")
    if options.threads:
        torch.set_num_threads(options.threads)
    return TorchBackend(Path(checkpoint), package.input.dtype == "uint8")

