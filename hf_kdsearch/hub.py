"""Export a student as a folder or Hub repo that both timm and transformers load, with a model card.

The format is timm's own Hub format, so nothing on the loading side is ours except the architecture registration:

- `model.safetensors`: the state dict, exactly as `model.state_dict()` holds it.
- `config.json`: `architecture`, `num_classes`, `pretrained_cfg` (input size, mean/std) and `model_args`, the keyword
  arguments that rebuild this exact shape through `timm.create_model(architecture, **model_args)`. For hf_kdsearch
  models these are `model.model_args` (per-block widths, removed blocks, hidden sizes); for other timm models, timm's
  record of the factory arguments.
- `README.md`: a model card rendered by `huggingface_hub.ModelCard.from_template` from `templates/student_card.md`
  (YAML metadata for the Hub, then teacher, method, budget, FLOPs, parameters, accuracy, widths, command, versions,
  and how to load it).

Every save is atomic: the folder is written beside its target under a temporary name and renamed into place, so a
kill, a full disk or an error leaves either the old folder or the new one, never a mix. A push saves locally first;
a failed push names the folder it leaves behind.

Loaders, after `import hf_kdsearch` (which registers the `cifar_*` and `mnist_*` architectures with timm):

- `timm.create_model("local-dir:<dir>" or "hf-hub:<repo>", pretrained=True)`, or `load_student(<dir or repo>)`;
- `transformers.AutoModelForImageClassification.from_pretrained(<dir or repo>)`: transformers recognises a timm
  config (no `model_type`) and builds a `TimmWrapperForImageClassification` around `timm.create_model(architecture,
  num_classes=num_labels, **model_args)`. That call passes `num_classes` itself, which is why `num_classes` must not
  also sit inside `model_args` (timm 1.0.31 puts it there; `save_student` takes it out).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_folder
from .batch import unwrap
from .checks import check_finite_weights
from .loading import HubUnavailableError, hub_unreachable_reason, load_model, network_errors
from .redact import redact_text
from .versions import version, versions

__all__ = ["HubUnavailableError", "save_student", "push_student", "load_student", "CARD_KEYS"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
CARD_TEMPLATE = Path(__file__).parent / "templates" / "student_card.md"
#: Seconds each request of a push may wait for an answer, unless `timeout=` or this environment variable says.
PUSH_TIMEOUT_ENV = "HF_KDSEARCH_PUSH_TIMEOUT"
DEFAULT_PUSH_TIMEOUT = 60.0

#: The keys `card` may hold, with what each means; see `save_student`.
CARD_KEYS = {
    "method": "how the student was trained, e.g. 'kd', 'search', 'unix', 'ensemble' or free text",
    "teacher": "the teacher's name, Hub id or path",
    "teacher_accuracy": "the teacher's metric on the same held-out data: a number, or a dict name -> value",
    "temperature": "the softmax temperature T of the KD loss (> 0)",
    "alpha": "the weight of the KD term in [0, 1]; the cross-entropy on labels gets 1 - alpha",
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


# ------------------------------------------------------------------------------------------------------- save
def save_student(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    card: dict | None = None,
    files: Sequence[str | os.PathLike] = (),
    allow_non_finite: bool = False,
) -> Path:
    """Write `model` to `save_directory` so that timm and transformers both load it, with a model card.

    The folder holds `model.safetensors`, a timm `config.json` whose `model_args` rebuild the exact shape (so a
    searched or exported student with its own per-layer widths comes back as itself), `README.md`, and copies of
    `files`. Before anything is written, the config is checked by rebuilding the architecture on the meta device from
    the config alone and comparing every tensor name and shape with `model.state_dict()`; a model that would not load
    (a gated search model not yet passed through `extract_student`, say) raises here rather than at load.

    The save is atomic: everything is written to a temporary folder beside `save_directory`, then renamed into place.
    A kill, a full disk or an error leaves the previous folder as it was, never a mix of old and new files. Files in
    an existing folder that this save does not write (your own notes, an earlier plot) are kept.

    Args:
        model: a timm model (built by `timm.create_model`, so it carries `pretrained_cfg`). DDP/FSDP wrappers,
            `torch.compile` and transformers' `TimmWrapper*` classes are unwrapped.
        save_directory: the folder; created if needed, and our files in it are replaced.
        card: what the model card should say; every key is optional, see `CARD_KEYS`: method, teacher,
            teacher_accuracy, temperature, alpha, dataset, metrics, accuracy, flops, params, widths,
            target_flops_ratio, command, notes, license, tags, label_names, hardware. Any other key is listed in the
            card's summary table under its own name.
        files: extra files copied into the folder (e.g. the search's widths plot and JSON summary); PNG images are
            embedded in the card.
        allow_non_finite: export weights holding NaN or infinity anyway; by default such a model is refused.

    Returns:
        The folder, as a `Path`.

    Example:
        ```python
        >>> student = timm.create_model("mnist_mlp", hidden_dims=(37, 19))
        >>> save_student(student, "out/student", card={"teacher": "mnist_mlp 512-512", "method": "kd"})
        >>> timm.create_model("local-dir:out/student", pretrained=True)  # or AutoModelForImageClassification
        ```
    """
    return _save(model, Path(save_directory), card=card, files=files, repo_id=None, allow_non_finite=allow_non_finite)


def _save(
    model: nn.Module,
    folder: Path,
    *,
    card: dict | None,
    files: Sequence[str | os.PathLike],
    repo_id: str | None,
    allow_non_finite: bool,
) -> Path:
    from safetensors.torch import save_file

    model = unwrap(model, timm_wrapper=True)
    card = _check_card(card)
    extra = _check_files(files)
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        _refuse_non_timm(model)
    # Clone so that views of a larger tensor (slices made by extraction), channels_last tensors and shared storage
    # serialise as themselves.
    if not allow_non_finite:
        check_finite_weights(model, name="the student", override="pass allow_non_finite=True")
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    with atomic_folder(folder, keep_other_files=True, what="student folder") as tmp:
        config = _export_config(model, tmp / CONFIG_NAME, label_names=card.get("label_names"))
        rebuilt = _rebuild_and_compare(config, state)  # raises before the folder is renamed into place
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        for src in extra:
            shutil.copyfile(src, tmp / src.name)
        card.setdefault("params", sum(p.numel() for p in model.parameters()))
        if "flops" not in card:
            from .flops import count_flops

            # Counted on the meta-device rebuild: no memory, no arithmetic, and the same shapes as the saved weights.
            card["flops"] = count_flops(rebuilt, input_size=tuple(config["pretrained_cfg"]["input_size"]))
        text = _card_text(config, card, [p.name for p in extra], repo_id=repo_id, folder=folder)
        (tmp / CARD_NAME).write_text(text, encoding="utf-8")
    return folder


def _check_card(card: Mapping | None) -> dict:
    card = dict(card or {})
    if "accuracy" in card:
        if not isinstance(card["accuracy"], (int, float)):
            raise ValueError(f"card['accuracy'] must be a number, got {card['accuracy']!r}")
        card["metrics"] = {"accuracy": card.pop("accuracy"), **(card.get("metrics") or {})}
    for key in ("metrics", "teacher_accuracy"):
        value = card.get(key)
        if key == "teacher_accuracy" and isinstance(value, (int, float)):
            continue
        if value is not None and not (
            isinstance(value, Mapping) and all(isinstance(v, (int, float, str)) for v in value.values())
        ):
            raise ValueError(f"card[{key!r}] must be a dict of name -> number, got {value!r}")
    ranges = {
        "target_flops_ratio": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "alpha": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "temperature": (lambda v: v > 0, "a finite number > 0"),
    }
    for key, (ok, what) in ranges.items():
        value = card.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise ValueError(f"card[{key!r}] must be {what}, got {value!r}")
    for key in ("flops", "params"):
        if key in card and not (isinstance(card[key], (int, float)) and card[key] >= 0):
            raise ValueError(f"card[{key!r}] must be a non-negative number, got {card[key]!r}")
    for key in [k for k in card if k == "widths" or k not in CARD_KEYS]:  # written as JSON into the card
        try:
            json.dumps(card[key])
        except TypeError as err:
            raise ValueError(f"card[{key!r}] must be JSON-serialisable, got {card[key]!r}: {err}") from err
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


def _refuse_non_timm(model: nn.Module) -> None:
    hint = ""
    if isinstance(getattr(model, "model_args", None), dict):
        hint = f" Build it with timm.create_model('<architecture>', num_classes=..., **{model.model_args!r})."
    raise ValueError(
        f"save_student needs a timm model built by timm.create_model (it carries `pretrained_cfg`, the "
        f"architecture name and input size); got a {type(model).__name__} without one.{hint}"
    )


def _export_config(model: nn.Module, path: Path, label_names: Sequence[str] | None) -> dict:
    # `save_config_for_hf` is the config half of timm's public `save_for_hf`. `save_for_hf` itself also writes
    # `model.state_dict()` as it is, which safetensors refuses for channels_last (non-contiguous) and tied tensors,
    # so the weights are written by `_save` from contiguous copies and only the config comes from timm.
    from timm.models._hub import save_config_for_hf

    model_config = {}
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise ValueError(f"card['label_names'] has {len(label_names)} names for {model.num_classes} classes")
        model_config["label_names"] = list(label_names)
    elif len(model.pretrained_cfg.get("label_names") or ()) == model.num_classes:
        # transformers reads class names from the config root only; timm keeps a loaded model's in pretrained_cfg.
        model_config["label_names"] = list(model.pretrained_cfg["label_names"])
    save_config_for_hf(model, str(path), model_config=model_config)
    config = json.loads(path.read_text())
    own_args = getattr(model, "model_args", None)
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
    path.write_text(json.dumps(config, indent=2) + "\n")
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


# ------------------------------------------------------------------------------------------------------- atomic
# ------------------------------------------------------------------------------------------------------- card
def _card_text(config: dict, card: dict, extra: list[str], *, repo_id: str | None, folder: Path) -> str:
    """The model card: YAML metadata from `_card_data`, the text from the Markdown template."""
    from huggingface_hub import ModelCard

    arch = config["architecture"]
    where = repo_id or str(folder)
    method_text = _method_text(card.get("method"))
    summary = f"A `{arch}` student"
    if card.get("teacher"):
        summary += f" distilled from `{card['teacher']}`"
    if method_text:
        summary += f" by {method_text}"
    images = [Path(f) for f in extra if f.lower().endswith(".png")]
    rendered = ModelCard.from_template(
        _card_data(config, card, name=repo_id.split("/")[-1] if repo_id else folder.name),
        template_path=str(CARD_TEMPLATE),
        name=repo_id.split("/")[-1] if repo_id else folder.name,
        summary=summary + f", exported by hf_kdsearch {version('hf_kdsearch')} in timm's format.",
        rows=[(label, _cell(value)) for label, value in _card_rows(config, card)],
        widths=_fmt_json(card["widths"]) if "widths" in card else None,
        arch_repr=repr(arch),
        num_classes=config["num_classes"],
        model_args=_fmt_json(config.get("model_args", {})),
        images=images,
        others=[f for f in extra if Path(f) not in images],
        command=card.get("command"),
        timm_name=repr(f"hf-hub:{repo_id}" if repo_id else f"local-dir:{where}"),
        where=repr(where),
        versions=list(versions().items()),
        hardware=card.get("hardware") or _hardware(),
        notes=card.get("notes"),
    )
    return redact_text(str(rendered))  # a token in a recorded command or a note never reaches the card


def _method_text(method: Any) -> str | None:
    return None if method is None else _METHODS.get(str(method).lower(), str(method))


def _card_data(config: dict, card: dict, name: str):
    from huggingface_hub import EvalResult, ModelCardData

    method, dataset, metrics = card.get("method"), card.get("dataset"), card.get("metrics") or {}
    tags = ["hf_kdsearch", "knowledge-distillation", "image-classification", "timm"]
    if method is not None and str(method).lower() in _METHODS:
        tags.append(f"kd-{str(method).lower()}")
    tags += [t for t in card.get("tags", []) if t not in tags]
    is_hub_dataset = isinstance(dataset, str) and all(c.isalnum() or c in "-_./" for c in dataset)
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
    return ModelCardData(
        library_name="timm",
        license=card.get("license") or config["pretrained_cfg"].get("license") or "apache-2.0",
        tags=tags,
        pipeline_tag="image-classification",
        datasets=[dataset] if is_hub_dataset else None,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )


def _card_rows(config: dict, card: dict) -> list[tuple[str, Any]]:
    size = "x".join(map(str, config["pretrained_cfg"]["input_size"]))
    rows = [("Architecture", f"`{config['architecture']}`, {config['num_classes']} classes, input {size}")]
    if card.get("teacher"):
        rows.append(("Teacher", f"`{card['teacher']}`"))
    if card.get("teacher_accuracy") is not None:
        rows.append(("Teacher accuracy", _fmt_metrics(card["teacher_accuracy"])))
    if _method_text(card.get("method")):
        rows.append(("Method", _method_text(card.get("method"))))
    if card.get("temperature") is not None:
        rows.append(("Temperature", f"T = {card['temperature']:g}"))
    if card.get("alpha") is not None:
        rows.append(("Alpha", f"{card['alpha']:g} (weight of the KD term; labels' cross-entropy gets the rest)"))
    if card.get("dataset"):
        rows.append(("Dataset", str(card["dataset"])))
    if card.get("target_flops_ratio") is not None:
        rows.append(("FLOPs budget", f"{100 * card['target_flops_ratio']:.4g}% of the teacher's FLOPs"))
    rows.append(("FLOPs", f"{_fmt_count(card['flops'])} per {size} sample, forward; a multiply-add counts 2"))
    rows.append(("Parameters", _fmt_count(card["params"])))
    metrics = card.get("metrics") or {}
    for k, v in metrics.items():
        label = k if k.lower() not in _TOP1_NAMES and "top" not in k.lower() else f"Accuracy ({k})"
        rows.append(("Accuracy" if k.lower() in ("accuracy", "acc") else label, str(v)))
    if not metrics:
        rows.append(("Accuracy", "not measured"))
    for k, v in card.items():  # facts a caller added beyond CARD_KEYS, e.g. an ensemble's member index
        if k not in CARD_KEYS:
            rows.append((str(k), v if isinstance(v, str) else json.dumps(v)))
    return rows


def _fmt_metrics(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


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


def _hardware() -> str:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} logical cores)"


# ------------------------------------------------------------------------------------------------------- hub
def push_student(
    model: nn.Module,
    repo_id: str,
    *,
    card: dict | None = None,
    files: Sequence[str | os.PathLike] = (),
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload student with hf_kdsearch",
    save_directory: str | os.PathLike | None = None,
    timeout: float | None = None,
    allow_non_finite: bool = False,
) -> str:
    """Save `model` locally in the `save_student` format, then push that folder to the Hub repo `repo_id`.

    The folder is written and checked first (see `save_student`), to `save_directory` or else to a new temporary
    folder; only then does `huggingface_hub` create the repo if it does not exist and upload the folder in one commit.
    Files already in the repo are kept or overwritten, never deleted. A temporary folder is removed after a successful
    push and kept after a failed one; either way the error names the folder and the `hf upload` command that retries.

    Every request of the push must get an answer within `timeout` seconds, so a Hub that accepts the connection but
    never answers ends in a `HubUnavailableError` instead of a hang. (File transfers that `huggingface_hub` hands to
    the `hf_xet` backend are outside this bound.)

    Args:
        model: the student (see `save_student`).
        repo_id: `"user/name"` or `"org/name"`.
        card: model card content, see `save_student` and `CARD_KEYS`.
        files: extra files for the repo; PNG images are embedded in the card.
        token: a Hub token; defaults to the one `huggingface_hub` finds (`HF_TOKEN`, `hf auth login`).
        private: visibility of a newly created repo; `None` keeps the Hub's default.
        commit_message: the commit's title.
        save_directory: where to keep the local copy; by default a temporary folder, removed after a successful push.
        timeout: seconds each request may wait for an answer; default `$HF_KDSEARCH_PUSH_TIMEOUT`, else 60.
        allow_non_finite: push weights holding NaN or infinity anyway (see `save_student`).

    Raises:
        HubUnavailableError: under `HF_HUB_OFFLINE=1`, when the Hub (`HF_ENDPOINT`) cannot be reached, or when it does
            not answer within `timeout`. The message names the local folder that was saved.
    """
    if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    seconds = _push_timeout(timeout)
    scratch = None if save_directory is not None else Path(tempfile.mkdtemp(prefix="hf_kdsearch_push_"))
    folder = Path(save_directory) if save_directory is not None else scratch / repo_id.replace("/", "--")
    save = dict(card=card, files=files, allow_non_finite=allow_non_finite)
    try:  # before any network call: a bad model never leaves an empty repo
        _save(model, folder, repo_id=repo_id, **save)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        url = _upload(
            model, folder, repo_id, save, token=token, private=private, message=commit_message, timeout=seconds
        )
    except BaseException as err:
        saved = f"The student was saved to {str(folder)!r}; upload it later with `hf upload {repo_id} {folder}`"
        if isinstance(err, network_errors()):
            raise HubUnavailableError(f"cannot push to {repo_id!r}: {_push_reason(err, seconds)}. {saved}.") from err
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"hf_kdsearch: {saved}")
        logger.error("push to %r failed: %s", repo_id, saved)
        raise
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return url


def _push_timeout(timeout: float | None) -> float:
    if timeout is None:
        env = os.environ.get(PUSH_TIMEOUT_ENV)
        try:
            timeout = float(env) if env else DEFAULT_PUSH_TIMEOUT
        except ValueError:
            raise ValueError(f"{PUSH_TIMEOUT_ENV} must be a number of seconds, got {env!r}") from None
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"the push timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def _push_reason(err: BaseException, seconds: float) -> str:
    if isinstance(err, TimeoutError) or "timeout" in type(err).__name__.lower():
        from huggingface_hub import constants

        return (
            f"the Hub at HF_ENDPOINT={constants.ENDPOINT} did not answer within {seconds:g} s "
            f"({type(err).__name__}); raise the limit with timeout= or {PUSH_TIMEOUT_ENV}, or retry later"
        )
    return hub_unreachable_reason(err) + "; unset HF_HUB_OFFLINE, or point HF_ENDPOINT at a reachable Hub"


def _upload(model, folder: Path, repo_id: str, save: dict, *, token, private, message: str, timeout: float) -> str:
    # timm's public `push_to_hf_hub` is not used: it writes its own README only when the repo has none (so our card
    # would never be updated), serialises `model.state_dict()` as is (channels_last weights fail), takes no extra
    # files, and uploads from a temporary folder it deletes, so nothing would survive a failed push.
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    api = HfApi(token=token, library_name="hf_kdsearch", library_version=version("hf_kdsearch"))
    with _bounded_requests(timeout):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if url.repo_id != repo_id:  # the Hub completed an implicit namespace: the card's snippets must say so
            _save(model, folder, repo_id=url.repo_id, **save)
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=message)
    return str(url)


@contextlib.contextmanager
def _bounded_requests(seconds: float) -> Iterator[None]:
    """Give every request `huggingface_hub` sends meanwhile a connect/read/write/pool timeout of at most `seconds`.

    huggingface_hub's shared client has no timeout (`timeout=None`), and `create_repo`/`upload_folder` take none. A
    request hook on that client (a public httpx feature, reached through the public `get_session`) sets the
    per-request timeout, which the transport reads when it sends; a tighter timeout huggingface_hub set is kept.
    """
    from huggingface_hub import get_session

    def bound(request) -> None:
        current = dict(request.extensions.get("timeout") or {})
        for key in ("connect", "read", "write", "pool"):
            current[key] = seconds if current.get(key) is None else min(current[key], seconds)
        request.extensions = {**request.extensions, "timeout": current}

    session = get_session()
    hooks = session.event_hooks
    session.event_hooks = {**hooks, "request": [*hooks["request"], bound]}
    try:
        yield
    finally:
        hooks = session.event_hooks
        session.event_hooks = {**hooks, "request": [h for h in hooks["request"] if h is not bound]}


def load_student(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a student written by `save_student` or `push_student` (or any timm or transformers image classifier).

    The same loader as `load_teacher` (`hf_kdsearch.loading.load_model`), without its refusal wrapper.

    Args:
        name_or_path: a local folder, `"local-dir:<folder>"`, a Hub repo id `"user/name"`, or `"hf-hub:user/name"`.
            A folder written by transformers' `save_pretrained` loads with `AutoModelForImageClassification`.
        kwargs: passed to `timm.create_model` (e.g. `num_classes` for a new head), or to `from_pretrained`.

    Returns:
        The model, in train mode as timm returns it; call `.eval()` for inference.

    Raises:
        FileNotFoundError: a path that does not exist (a close match is suggested), a folder without `config.json`,
            or a name that is neither a folder nor a Hub repo.
        HubUnavailableError: a Hub id that is not cached while offline or when the Hub cannot be reached.
        ValueError: a `config.json` that is neither timm's nor transformers'.
    """
    return load_model(name_or_path, role="student", **kwargs)
