"""Export a student as a folder or Hub repo that both timm and transformers load, with a model card.

The format is timm's own Hub format, so nothing on the loading side is ours except the architecture registration:

- `model.safetensors`: the state dict, exactly as `model.state_dict()` holds it.
- `config.json`: `architecture`, `num_classes`, `pretrained_cfg` (input size, mean/std) and `model_args`, the keyword
  arguments that rebuild this exact shape through `timm.create_model(architecture, **model_args)`. For hf_kdsearch
  models these are `model.model_args` (per-block widths, removed blocks, hidden sizes); for other timm models, timm's
  record of the factory arguments.
- `README.md`: a model card (YAML metadata for the Hub, then teacher, method, budget, FLOPs, parameters, accuracy,
  widths, command, versions, and how to load it).

Loaders, after `import hf_kdsearch` (which registers the `cifar_*` and `mnist_*` architectures with timm):

- `timm.create_model("local-dir:<dir>" or "hf-hub:<repo>", pretrained=True)`, or `load_student(<dir or repo>)`;
- `transformers.AutoModelForImageClassification.from_pretrained(<dir or repo>)`: transformers recognises a timm
  config (no `model_type`) and builds a `TimmWrapperForImageClassification` around `timm.create_model(architecture,
  num_classes=num_labels, **model_args)`. That call passes `num_classes` itself, which is why `num_classes` must not
  also sit inside `model_args` (timm 1.0.31 puts it there; `save_student` takes it out).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HubUnavailableError", "save_student", "push_student", "load_student", "CARD_KEYS"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"

#: The keys `card` may hold, with what each means; see `save_student`.
CARD_KEYS = {
    "method": "how the student was trained, e.g. 'kd', 'search', 'unix', 'ensemble' or free text",
    "teacher": "the teacher's name, Hub id or path",
    "dataset": "the training data; a Hub dataset id also goes into the YAML `datasets`",
    "metrics": "dict name -> value measured on held-out data, e.g. {'top1': 71.2, 'top5': 91.0}",
    "accuracy": "shorthand for metrics={'accuracy': value}",
    "flops": "forward FLOPs of one sample (computed with `count_flops` at the config's input size if absent)",
    "params": "parameter count (computed if absent)",
    "widths": "any JSON-able per-layer description, e.g. {'stages.0.0': [16, 7]} (teacher, found)",
    "target_flops_ratio": "the FLOPs budget as a fraction of the teacher's, in (0, 1]",
    "command": "the exact command that produced the model",
    "notes": "free text appended to the card",
    "license": "SPDX id for the YAML header (default: the architecture's, else apache-2.0)",
    "tags": "extra Hub tags",
    "label_names": "class names, one per output; written to config.json so transformers shows them as id2label",
    "hardware": "what it was trained on (default: the machine that writes the card)",
}

_METHODS = {
    "kd": "logit distillation (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531)",
    "search": "student search with L1 architecture gates (Gu & Tresp 2020, https://arxiv.org/abs/2001.11612)",
    "unix": "UNIX uncertainty-aware mixup (Xu, Liu & Loy 2023, https://arxiv.org/abs/2012.09413)",
    "ensemble": "online ensemble compression (Walawalkar, Shen & Savvides 2020, https://arxiv.org/abs/2011.07449)",
    "alone": "trained alone, without a teacher (baseline)",
}
_TOP1_NAMES = ("top1", "top-1", "top_1", "accuracy", "acc", "eval_accuracy", "eval_top1")


class HubUnavailableError(ConnectionError):
    """The Hugging Face Hub cannot be reached (offline mode, no network, or a wrong `HF_ENDPOINT`)."""


# ------------------------------------------------------------------------------------------------------- save
def save_student(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    card: dict | None = None,
    files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write `model` to `save_directory` so that timm and transformers both load it, with a model card.

    The folder holds `model.safetensors`, a timm `config.json` whose `model_args` rebuild the exact shape (so a
    searched or exported student with its own per-layer widths comes back as itself), `README.md`, and copies of
    `files`. Before returning, the config is checked by rebuilding the architecture on the meta device from the
    written config alone and comparing every tensor name and shape with `model.state_dict()`; a model that would
    not load (a gated search model not yet passed through `extract_student`, say) raises here rather than at load.

    Args:
        model: a timm model (built by `timm.create_model`, so it carries `pretrained_cfg`). DDP/FSDP wrappers,
            `torch.compile` and transformers' `TimmWrapper*` classes are unwrapped.
        save_directory: the folder; created if needed, and our files in it are overwritten.
        card: what the model card should say; every key is optional, see `CARD_KEYS`: method, teacher, dataset,
            metrics, accuracy, flops, params, widths, target_flops_ratio, command, notes, license, tags,
            label_names, hardware. Any other key is listed in the card's summary table under its own name.
        files: extra files copied into the folder (e.g. the search's widths plot and JSON summary); PNG images are
            embedded in the card.

    Returns:
        The folder, as a `Path`.

    Example:
        ```python
        >>> student = timm.create_model("mnist_mlp", hidden_dims=(37, 19))
        >>> save_student(student, "out/student", card={"teacher": "mnist_mlp 512-512", "method": "kd"})
        >>> timm.create_model("local-dir:out/student", pretrained=True)  # or AutoModelForImageClassification
        ```
    """
    return _save(model, Path(save_directory), card=card, files=files, repo_id=None)


def _save(
    model: nn.Module,
    folder: Path,
    *,
    card: dict | None,
    files: Sequence[str | os.PathLike],
    repo_id: str | None,
) -> Path:
    from safetensors.torch import save_file

    model = _unwrap(model)
    card = _check_card(card)
    extra = _check_files(files)
    config = _export_config(model, label_names=card.get("label_names"))
    # Clone so that views of a larger tensor (slices made by extraction) and shared storage serialise as themselves.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    rebuilt = _rebuild_and_compare(config, state)  # before writing anything: a failed save leaves no half folder

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    for src in extra:
        shutil.copyfile(src, folder / src.name)

    if "params" not in card:
        card["params"] = sum(p.numel() for p in model.parameters())
    if "flops" not in card:
        from .flops import count_flops

        # Counted on the meta-device rebuild: no memory, no arithmetic, and the same shapes as the saved weights.
        card["flops"] = count_flops(rebuilt, input_size=tuple(config["pretrained_cfg"]["input_size"]))
    text = _card_text(config, card, [p.name for p in extra], repo_id=repo_id, folder=folder)
    (folder / CARD_NAME).write_text(text, encoding="utf-8")
    return folder


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/FSDP keep the model in `.module`, torch.compile in `._orig_mod`, transformers' TimmWrapper in `.timm_model`.
    for attr in ("module", "_orig_mod", "timm_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def _check_card(card: Mapping | None) -> dict:
    card = dict(card or {})
    if "accuracy" in card:
        if not isinstance(card["accuracy"], (int, float)):
            raise ValueError(f"card['accuracy'] must be a number, got {card['accuracy']!r}")
        card["metrics"] = {"accuracy": card.pop("accuracy"), **(card.get("metrics") or {})}
    metrics = card.get("metrics")
    if metrics is not None and not (
        isinstance(metrics, Mapping) and all(isinstance(v, (int, float, str)) for v in metrics.values())
    ):
        raise ValueError(f"card['metrics'] must be a dict of name -> number, got {metrics!r}")
    ratio = card.get("target_flops_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"card['target_flops_ratio'] must be a fraction in (0, 1], got {ratio!r}")
    for key in ("flops", "params"):
        if key in card and not (isinstance(card[key], (int, float)) and card[key] >= 0):
            raise ValueError(f"card[{key!r}] must be a non-negative number, got {card[key]!r}")
    if "widths" in card:
        try:
            json.dumps(card["widths"])
        except TypeError as err:
            raise ValueError(f"card['widths'] must be JSON-serialisable, got {card['widths']!r}: {err}") from err
    tags = card.get("tags", [])
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"card['tags'] must be a list of strings, got {tags!r}")
    return card


def _check_files(files: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"file to add to the student folder does not exist: {str(path)!r}")
        if path.name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
            raise ValueError(f"{str(path)!r} would overwrite the exported {path.name}; rename it")
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"files must have distinct names (they are copied flat into the folder), got {names}")
    return paths


def _export_config(model: nn.Module, label_names: Sequence[str] | None) -> dict:
    from timm.models._hub import save_config_for_hf

    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        hint = ""
        if isinstance(getattr(model, "model_args", None), dict):
            hint = f" Build it with timm.create_model('<architecture>', num_classes=..., **{model.model_args!r})."
        raise ValueError(
            f"save_student needs a timm model built by timm.create_model (it carries `pretrained_cfg`, the "
            f"architecture name and input size); got a {type(model).__name__} without one.{hint}"
        )
    model_config = {}
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise ValueError(f"card['label_names'] has {len(label_names)} names for {model.num_classes} classes")
        model_config["label_names"] = list(label_names)
    elif len(model.pretrained_cfg.get("label_names") or ()) == model.num_classes:
        # transformers reads class names from the config root only; timm keeps a loaded model's in pretrained_cfg.
        model_config["label_names"] = list(model.pretrained_cfg["label_names"])
    own_args = getattr(model, "model_args", None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_NAME
        save_config_for_hf(model, str(path), model_config=model_config)
        config = json.loads(path.read_text())
    if isinstance(own_args, dict):
        # Our models record exactly the arguments that rebuild them; timm's factory record may be stale after
        # extraction or export, and it is a subset.
        try:
            config["model_args"] = json.loads(json.dumps(own_args))
        except TypeError as err:
            raise ValueError(f"model.model_args must be JSON-serialisable, got {own_args!r}: {err}") from err
    # transformers passes num_classes=num_labels itself and would get it twice; the root `num_classes` carries it.
    config.get("model_args", {}).pop("num_classes", None)
    if not config.get("model_args"):
        config.pop("model_args", None)
    return config


def _rebuild_and_compare(config: dict, state: Mapping[str, torch.Tensor]) -> nn.Module:
    import timm

    kwargs = {"num_classes": config["num_classes"], **config.get("model_args", {})}
    call = f"timm.create_model({config['architecture']!r}, **{kwargs})"
    try:
        try:
            with torch.device("meta"):
                rebuilt = timm.create_model(config["architecture"], **kwargs)
        except (RuntimeError, NotImplementedError):  # an architecture whose __init__ computes on tensor values
            rebuilt = timm.create_model(config["architecture"], **kwargs)
    except Exception as err:  # whatever the constructor raises, the export could not be loaded
        raise ValueError(f"the exported config would not rebuild this model: {call} fails: {err}") from err
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if expected != actual:
        missing = sorted(set(expected) - set(actual))[:5]
        unexpected = sorted(set(actual) - set(expected))[:5]
        shapes = [f"{k}: saved {actual[k]}, rebuilt {v}" for k, v in expected.items() if actual.get(k, v) != v][:5]
        raise ValueError(
            f"the exported config would not rebuild this model: {call} differs from its state dict "
            f"(missing {missing}, unexpected {unexpected}, shapes {shapes}). "
            f"A gated search model must go through extract_student first; a model changed after construction must "
            f"update `model.model_args`."
        )
    return rebuilt.eval()


# ------------------------------------------------------------------------------------------------------- card
def _fmt_count(n: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{int(n):,} ({n / scale:.2f} {prefix})"
    return f"{int(n):,}"


def _cell(value: Any) -> str:
    # A markdown table cell: one line, and a literal "|" would end the cell.
    return " ".join(str(value).split()).replace("|", "\\|")


def _fmt_json(value: Any) -> str:
    # One entry per line: per-layer width lists stay readable without one number per line.
    if isinstance(value, Mapping) and value:
        rows = [f"  {json.dumps(str(k))}: {json.dumps(v)}" for k, v in value.items()]
        return "{\n" + ",\n".join(rows) + "\n}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple, Mapping)) for v in value):
        return "[\n" + ",\n".join(f"  {json.dumps(v)}" for v in value) + "\n]"
    return json.dumps(value)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("hf_kdsearch", "torch", "transformers", "timm", "huggingface_hub", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _hardware() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} logical cores)"


def _card_text(config: dict, card: dict, extra: list[str], *, repo_id: str | None, folder: Path) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    arch = config["architecture"]
    name = repo_id.split("/")[-1] if repo_id else folder.name
    method = card.get("method")
    method_text = _METHODS.get(str(method).lower(), method) if method is not None else None
    dataset = card.get("dataset")
    metrics = card.get("metrics") or {}
    input_size = tuple(config["pretrained_cfg"]["input_size"])
    license_ = card.get("license") or config["pretrained_cfg"].get("license") or "apache-2.0"

    tags = ["hf_kdsearch", "knowledge-distillation", "image-classification", "timm"]
    if method is not None and str(method).lower() in _METHODS:
        tags.append(f"kd-{str(method).lower()}")
    tags += [t for t in card.get("tags", []) if t not in tags]
    is_hub_dataset = isinstance(dataset, str) and all(c.isalnum() or c in "-_./" for c in dataset)
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset if is_hub_dataset else "custom",
                dataset_name=str(dataset or "custom"),
                metric_type="accuracy" if k.lower() in _TOP1_NAMES else k,
                metric_name=k,
                metric_value=v,
            )
            for k, v in metrics.items()
        ]
    data = ModelCardData(
        library_name="timm",
        license=license_,
        tags=tags,
        pipeline_tag="image-classification",
        datasets=[dataset] if is_hub_dataset else None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
    )

    where = repo_id or str(folder)
    lines = [f"# {name}", ""]
    summary = f"A `{arch}` student"
    if card.get("teacher"):
        summary += f" distilled from `{card['teacher']}`"
    if method_text:
        summary += f" by {method_text}"
    lines += [summary + ", exported by hf_kdsearch in timm's format.", ""]

    rows = [("Architecture", f"`{arch}`, {config['num_classes']} classes, input {'x'.join(map(str, input_size))}")]
    if card.get("teacher"):
        rows.append(("Teacher", f"`{card['teacher']}`"))
    if method_text:
        rows.append(("Method", method_text))
    if dataset:
        rows.append(("Dataset", str(dataset)))
    if card.get("target_flops_ratio") is not None:
        rows.append(("FLOPs budget", f"{100 * card['target_flops_ratio']:.4g}% of the teacher's FLOPs"))
    size = "x".join(map(str, input_size))
    rows.append(("FLOPs", f"{_fmt_count(card['flops'])} per {size} sample, forward; a multiply-add counts 2"))
    rows.append(("Parameters", _fmt_count(card["params"])))
    for k, v in metrics.items():
        label = k if k.lower() not in _TOP1_NAMES and "top" not in k.lower() else f"Accuracy ({k})"
        rows.append(("Accuracy" if k.lower() in ("accuracy", "acc") else label, str(v)))
    if not metrics:
        rows.append(("Accuracy", "not measured"))
    for k, v in card.items():  # facts a caller added beyond CARD_KEYS, e.g. an ensemble's member index
        if k not in CARD_KEYS:
            rows.append((str(k), v if isinstance(v, str) else json.dumps(v)))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]

    if "widths" in card:
        lines += ["## Widths", "", "```json", _fmt_json(card["widths"]), "```", ""]
    lines += [
        "## Architecture arguments",
        "",
        f"`timm.create_model({arch!r}, num_classes={config['num_classes']}, **model_args)` rebuilds this shape:",
        "",
        "```json",
        _fmt_json(config.get("model_args", {})),
        "```",
        "",
    ]
    images = [f for f in extra if f.lower().endswith(".png")]
    others = [f for f in extra if f not in images]
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    if others:
        lines += ["Other files: " + ", ".join(f"[`{f}`]({f})" for f in others), ""]
    if card.get("command"):
        lines += ["## Command", "", "```bash", str(card["command"]), "```", ""]

    timm_name = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{where}"
    lines += [
        "## How to load",
        "",
        "The architecture is registered with timm by `import hf_kdsearch` (`pip install hf_kdsearch`).",
        "",
        "```python",
        "import hf_kdsearch  # registers the architecture with timm",
        "import timm",
        "from transformers import AutoModelForImageClassification",
        "",
        f"model = timm.create_model({timm_name!r}, pretrained=True).eval()",
        f"model = AutoModelForImageClassification.from_pretrained({where!r}).eval()  # logits in .logits",
        "```",
        "",
        "## Environment",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in _versions().items()],
        f"| hardware | {card.get('hardware') or _hardware()} |",
        "",
    ]
    if card.get("notes"):
        lines += ["## Notes", "", str(card["notes"]), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


# ------------------------------------------------------------------------------------------------------- hub
def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def _unavailable(action: str, err: BaseException | None) -> HubUnavailableError:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        reason = "HF_HUB_OFFLINE=1 is set"
    else:
        reason = f"the Hub at HF_ENDPOINT={constants.ENDPOINT} could not be reached"
        if err is not None:
            reason += f" ({type(err).__name__}: {err})"
    return HubUnavailableError(
        f"cannot {action}: {reason}. Unset HF_HUB_OFFLINE, or point HF_ENDPOINT at a reachable Hub; or save the "
        f"student locally with hf_kdsearch.save_student(model, 'out/student') and upload the folder later with "
        f"`hf upload <repo_id> out/student`."
    )


def push_student(
    model: nn.Module,
    repo_id: str,
    *,
    card: dict | None = None,
    files: Sequence[str | os.PathLike] = (),
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload student with hf_kdsearch",
) -> str:
    """Push `model` to the Hub repo `repo_id` in the `save_student` format, with its model card; returns the repo URL.

    The folder is written and checked locally first (see `save_student`), then `huggingface_hub` creates the repo if
    it does not exist and uploads the folder in one commit. Files already in the repo are kept or overwritten, never
    deleted.

    Args:
        model: the student (see `save_student`).
        repo_id: `"user/name"` or `"org/name"`.
        card: model card content, see `save_student` and `CARD_KEYS`.
        files: extra files for the repo; PNG images are embedded in the card.
        token: a Hub token; defaults to the one `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`).
        private: visibility of a newly created repo; `None` keeps the Hub's default.
        commit_message: the commit's title.

    Raises:
        HubUnavailableError: under `HF_HUB_OFFLINE=1`, or when the Hub (`HF_ENDPOINT`) cannot be reached. The
            message suggests `save_student` instead.
    """
    from huggingface_hub import HfApi, constants

    if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="hf_kdsearch_push_") as tmp:
        folder = Path(tmp) / "student"
        # Write and verify before touching the network, so a bad model never leaves an empty repo behind.
        _save(model, folder, card=card, files=files, repo_id=repo_id)
        if constants.is_offline_mode():
            raise _unavailable(f"push to {repo_id!r}", None)
        api = HfApi(token=token, library_name="hf_kdsearch", library_version=_versions()["hf_kdsearch"])
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            if url.repo_id != repo_id:  # the Hub completed an implicit namespace: the card's snippets must say so
                _save(model, folder, card=card, files=files, repo_id=url.repo_id)
            api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=commit_message)
        except _network_errors() as err:
            raise _unavailable(f"push to {repo_id!r}", err) from err
    return str(url)


def load_student(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a student written by `save_student` or `push_student`, with timm.

    Args:
        name_or_path: a local folder, `"local-dir:<folder>"`, a Hub repo id `"user/name"`, or `"hf-hub:user/name"`.
        kwargs: passed to `timm.create_model` (e.g. `num_classes` for a new head).

    Returns:
        The model, in train mode as timm returns it; call `.eval()` for inference.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without `config.json`.
        HubUnavailableError: a Hub id that is not cached while offline or when the Hub cannot be reached.
    """
    import timm

    name = os.fspath(name_or_path)
    if name.startswith("local-dir:"):
        name = name[len("local-dir:") :]
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, CONFIG_NAME)):
            raise FileNotFoundError(f"{name!r} is a folder but has no {CONFIG_NAME}; is it a save_student folder?")
        return timm.create_model(f"local-dir:{os.path.abspath(name)}", pretrained=True, **kwargs)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no student folder at {name!r}")
    repo = name if name.startswith("hf-hub:") else f"hf-hub:{name}"
    try:
        return timm.create_model(repo, pretrained=True, **kwargs)
    except _network_errors() as err:
        raise _unavailable(f"download {repo!r}", err) from err
