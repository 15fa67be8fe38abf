"""What a figure was measured on: the CPU's model and vector extensions travel with every benchmark,
because the same packages give other speedups on other CPUs (AVX-512's int8 kernels above all)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Dict, List

from cskd.runtime import cores

# The x86 extensions that onnxruntime's and PyTorch's CPU kernels dispatch on, in the order of their age.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_int8")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.split("\n\n")[0].splitlines():  # the first processor describes them all
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def vector_extensions(flags: str) -> List[str]:
    present = set(flags.split())
    return [f for f in VECTOR_FLAGS if f in present]


def describe() -> Dict[str, object]:
    """{"cpu": model name, "vector": [extensions], "cores": usable cores (a container's quota counted), "system", "python"}."""
    info = _cpuinfo()
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "vector": vector_extensions(info.get("flags", "")),
        "cores": cores.usable_cores(),
        "system": platform.platform(),
        "python": platform.python_version(),
    }


def one_line(machine: Dict[str, object]) -> str:
    vector = ", ".join(machine.get("vector") or []) or "no AVX"
    return f"{machine['cpu']} ({vector}), {machine['cores']} cores"
