"""The torch-free runtime: model packages, image preprocessing, inference backends, top-k.

``cskd export`` writes packages with it; ``cskd serve``, ``cskd predict`` and ``cskd bench`` read
and run them with it. Nothing here imports torch or timm at module level, so the CPU serving image
(onnxruntime, FastAPI) stays small.
"""
