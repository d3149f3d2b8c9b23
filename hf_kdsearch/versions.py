"""The versions of the libraries a run used, as installed (`importlib.metadata`): for model cards, results files and
the Hub's user agent. This module imports nothing from the rest of the package."""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["LIBRARIES", "version", "versions"]

#: What a model card or a results file records.
LIBRARIES = ("hf_kdsearch", "torch", "transformers", "timm", "huggingface_hub", "safetensors")


def version(package: str) -> str:
    """The installed version of `package`, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Python's version and each package's, by name."""
    return {"python": platform.python_version(), **{p: version(p) for p in packages}}
