"""One loader for teachers and students: a folder, a Hub repo id or a timm name; timm's or transformers' format.

`teacher.load_teacher` and `hub.load_student` are thin wrappers around `load_model`. How a name is read:

| name | loaded with |
|---|---|
| a folder (or `local-dir:<folder>`) whose `config.json` has `architecture` | `timm.create_model("local-dir:...")` |
| a folder whose `config.json` has `model_type` | its `architectures` class, else `AutoModelForImageClassification` |
| `hf-hub:<repo>` or `timm/<name>` | `timm.create_model("hf-hub:...")` |
| a timm architecture with pretrained weights (`resnet18.a1_in1k`) | `timm.create_model(name, pretrained=True)` |
| any other Hub id | the repo's `config.json` decides between the two above |

A timm architecture without pretrained weights (every `cifar_*` and `mnist_*`) is refused: `pretrained=True` would
warn and hand back random weights. Only public APIs are used: `huggingface_hub.constants.is_offline_mode()`,
`hf_hub_download`, `timm.is_model`, `timm.models.get_pretrained_cfg` and `timm.create_model`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["HubUnavailableError", "ModelLoadError", "ModelNotFoundError", "load_model", "network_errors"]

CONFIG_NAME = "config.json"

_HINTS = {
    "teacher": "Pass a local folder (save one with `hf_kdsearch.save_student` or `model.save_pretrained`) or a model "
    "object as teacher_model.",
    "student": "Pass the folder `hf_kdsearch.save_student` wrote, or a Hub repo id `push_student` pushed to.",
}


class HubUnavailableError(ConnectionError):
    """The Hugging Face Hub cannot be reached (offline mode, no network, a wrong `HF_ENDPOINT`, no answer in time)."""


class ModelNotFoundError(FileNotFoundError):
    """Nothing of that name: no such local folder, no `config.json` in it, and no such Hub repo."""


class ModelLoadError(ValueError):
    """The name resolves, but not to weights a loader can use (a timm name without weights, an unknown config)."""


def network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the Hub could not be reached": offline mode, refused, reset or timed out."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    # huggingface_hub's HTTP client changed between releases (requests, httpx, httpx2); each raises its own types.
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)), ("requests", ("Timeout",))):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def hub_unreachable_reason(err: BaseException | None) -> str:
    """Why the Hub could not serve a request: offline mode, or the endpoint that did not answer."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set (=1), so the Hub is not asked"
    reason = f"the Hub at HF_ENDPOINT={constants.ENDPOINT} could not be reached"
    return reason + (f" ({type(err).__name__}: {err})" if err is not None else "")


def load_model(name_or_path: str | os.PathLike, *, role: str = "model", **kwargs: Any) -> nn.Module:
    """Load a model from a local folder, a Hub repo id or a timm architecture name (see the module docstring).

    Args:
        name_or_path: the folder, `local-dir:<folder>`, `hf-hub:<repo>`, `timm/<name>`, a timm name, or a Hub id.
        role: "teacher", "student" or "model"; only the wording of the errors depends on it.
        kwargs: passed to `timm.create_model` or to `AutoModelForImageClassification.from_pretrained`.

    Raises:
        ModelNotFoundError: no such folder, a folder without `config.json`, or no such Hub repo. A `FileNotFoundError`.
        ModelLoadError: a timm name without pretrained weights, a `config.json` of neither format, or a folder
            holding git-lfs pointer files in place of its weights (run `git lfs pull`).
        HubUnavailableError: offline (`HF_HUB_OFFLINE`), or the Hub (`HF_ENDPOINT`) could not be reached.
        Errors of the loaders themselves (a wrong keyword argument, mismatched weights) propagate unchanged.
    """
    import timm

    name = os.fspath(name_or_path)
    if name.startswith("local-dir:") or os.path.isdir(name):
        return _load_folder(name.removeprefix("local-dir:"), role, kwargs)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path; a Hub id has at most one "/"
        raise ModelNotFoundError(f"no {role} folder at {name!r}{_did_you_mean(name)} (and it is not a Hub id either)")
    if name.startswith(("hf-hub:", "timm/")):
        with _hub_errors(name, role):
            return timm.create_model(f"hf-hub:{name.removeprefix('hf-hub:')}", pretrained=True, **kwargs)
    if "/" not in name and timm.is_model(name):
        _check_pretrained(name, role)
        with _hub_errors(name, role):
            return timm.create_model(name, pretrained=True, **kwargs)
    return _load_hub_repo(name, role, kwargs)


def _load_folder(folder: str, role: str, kwargs: dict) -> nn.Module:
    import timm

    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"no {role} folder at {folder!r}{_did_you_mean(folder)}")
    _refuse_lfs_pointers(folder, role)
    config_file = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise ModelNotFoundError(
            f"{role} folder {folder!r} has no {CONFIG_NAME}; is it a folder written by `hf_kdsearch.save_student` "
            f"(timm's format) or by `save_pretrained` (transformers')?"
        )
    with open(config_file) as f:
        config = json.load(f)
    if _config_format(config, config_file) == "timm":
        return timm.create_model(f"local-dir:{os.path.abspath(folder)}", pretrained=True, **kwargs)
    return _auto_model(folder, config, kwargs)


#: The first line of a git-lfs pointer file, which a clone without git-lfs holds in place of each large file.
LFS_POINTER_HEADER = b"version https://git-lfs.github.com/spec/v1"


def _refuse_lfs_pointers(folder: str, role: str) -> None:
    """Raise `ModelLoadError` if files of `folder` are git-lfs pointers: a clone without git-lfs holds these small
    text files in place of the weights, which safetensors would report as "header too large"."""
    pointers = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file() and entry.stat().st_size < 1024:  # a pointer is about 130 bytes
                with open(entry.path, "rb") as f:
                    if f.read(len(LFS_POINTER_HEADER)) == LFS_POINTER_HEADER:
                        pointers.append(entry.name)
    if pointers:
        raise ModelLoadError(
            f"{role} folder {folder!r} holds git-lfs pointer files, not the files themselves "
            f"({', '.join(sorted(pointers))}): it was cloned without git-lfs; run `git lfs pull` in {folder!r} "
            "(after `git lfs install`)"
        )


def _load_hub_repo(repo_id: str, role: str, kwargs: dict) -> nn.Module:
    import timm
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id, role):
        with open(hf_hub_download(repo_id, CONFIG_NAME)) as f:
            config = json.load(f)
        if _config_format(config, f"{repo_id}/{CONFIG_NAME} on the Hub") == "timm":
            return timm.create_model(f"hf-hub:{repo_id}", pretrained=True, **kwargs)
        return _auto_model(repo_id, config, kwargs)


def _config_format(config: dict, where: str) -> str:
    if "architecture" in config and "model_type" not in config:
        return "timm"
    if "model_type" in config:
        return "transformers"
    raise ModelLoadError(
        f"{where} is neither a timm config (it has no 'architecture') nor a transformers config (no 'model_type')"
    )


def _auto_model(name: str, config: dict, kwargs: dict) -> nn.Module:
    """A transformers model: the class its config names (`architectures`, e.g. `BertForSequenceClassification` for
    a text teacher), else `AutoModelForImageClassification`."""
    import transformers

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModelForImageClassification
    return model_class.from_pretrained(name, **kwargs)


def _check_pretrained(name: str, role: str) -> None:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
        raise ModelLoadError(
            f"timm has no pretrained weights for {name!r}, so a {role} loaded by that name would be randomly "
            f"initialised; train one first and pass its folder (e.g. one written by `hf_kdsearch.save_student`), "
            f"or pass a model object"
        )


def _did_you_mean(path: str) -> str:
    parent, base = os.path.split(os.path.expanduser(path.rstrip("/")))
    try:
        siblings = [e for e in os.listdir(parent or ".") if os.path.isdir(os.path.join(parent or ".", e))]
    except OSError:
        return ""
    close = difflib.get_close_matches(base, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {os.path.join(parent, close[0])!r}?)"
    return f" (the folder {parent!r} exists, but holds no {base!r})" if parent else ""


@contextlib.contextmanager
def _hub_errors(name: str, role: str) -> Iterator[None]:
    """Turn the Hub's "not there" and "cannot reach" errors into ours, naming the cause and the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hint = _HINTS.get(role, "Pass a local folder.")
    local = _did_you_mean(name)  # a typo'd relative folder ("out/studnet") also reads as a Hub id
    try:
        yield
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError: offline or unreachable, not a missing file
        raise _unreachable(name, role, err, local, hint) from err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, HFValidationError) as err:
        raise ModelNotFoundError(
            f"could not load the {role} {name!r}: there is no local folder of that name{local}, and the Hub at "
            f"HF_ENDPOINT={constants.ENDPOINT} has no such model repo (or it is private or gated: log in with "
            f"`hf auth login`). {hint} ({type(err).__name__}: {err})"
        ) from err
    except network_errors() as err:
        raise _unreachable(name, role, err, local, hint) from err


def _unreachable(name: str, role: str, err: BaseException, local: str, hint: str) -> Exception:
    message = (
        f"could not load the {role} {name!r}: {hub_unreachable_reason(err)}, and it is not in the local cache. {hint}"
    )
    if local:  # the user most likely meant a local folder
        return ModelNotFoundError(f"no {role} folder at {name!r}{local}; read as a Hub id, {message}")
    return HubUnavailableError(message)
