"""The packaged configs (recipes): YAML files that ``--config NAME`` names. Standard library only, so
``cskd train --help`` lists them without loading the training stack."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("cskd") / "configs" / f"{name}.yaml"))


def packaged_names() -> List[str]:
    return sorted(p.name[:-5] for p in resources.files("cskd").joinpath("configs").iterdir() if p.name.endswith(".yaml"))
