"""Top-k labels for image files through a model package (what ``cskd predict`` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from cskd.errors import CSKDError
from cskd.runtime.backends import BackendOptions, create_backend, run_batched
from cskd.runtime.postprocess import top_k
from cskd.runtime.preprocess import ImageDecodeError, decode_for, to_engine_input


def predict_files(model_dir: Path, images: Sequence[Path], k: int = 5, backend: Optional[str] = None,
                  batch_size: int = 32, providers: Optional[List[str]] = None) -> List[Dict[str, object]]:
    engine, package = create_backend(model_dir, backend, BackendOptions(providers=providers))
    spec = package.input
    arrays = []
    for path in images:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CSKDError(f"cannot read {path} ({exc.strerror}); pass existing image files") from None
        try:
            arrays.append(decode_for(spec, data))
        except ImageDecodeError as exc:
            raise CSKDError(f"{path}: {exc}") from None
    batch = np.stack(arrays)
    size = package.batch_limit(batch_size)
    logits = run_batched(lambda rows: engine.infer(to_engine_input(rows, spec.dtype, spec.mean, spec.std)), batch, size)
    return [{"image": str(path), "top": top} for path, top in zip(images, top_k(logits, k, package.classes))]


def format_predictions(results: List[Dict[str, object]]) -> str:
    lines = []
    for result in results:
        best = ", ".join(f"{t['label']} {100 * t['score']:.1f}%" for t in result["top"])
        lines.append(f"{result['image']}: {best}")
    return "\n".join(lines)
