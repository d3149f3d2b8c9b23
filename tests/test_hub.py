"""save_student / push_student / load_student: both loaders give back the original logits; the card says what it must.

The push and pull run against `hub_server.LoopbackHub` on 127.0.0.1, in subprocesses, because `huggingface_hub`
reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` when it is imported.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from hub_server import LoopbackHub
from huggingface_hub import ModelCard, constants
from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

import hf_kdsearch
from hf_kdsearch import HubUnavailableError, TeacherLoadError, count_flops, load_student, push_student, save_student
from hf_kdsearch.hub import CARD_KEYS
from hf_kdsearch.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]

# (architecture, create_model kwargs, input size): every one has widths no registered default has.
STUDENTS = {
    "cifar_resnet8": ("cifar_resnet8", {"num_classes": 10, "block_widths": [[5], [7], [9]], "removed_blocks": ["2.0"]}),
    "mnist_mlp": ("mnist_mlp", {"hidden_dims": (37, 19)}),
    "mnist_cnn": ("mnist_cnn", {"widths": (6, 11, 9), "pool_every": 2}),
}


def make_student(key: str, seed: int = 0) -> torch.nn.Module:
    arch, kwargs = STUDENTS[key]
    torch.manual_seed(seed)
    model = timm.create_model(arch, **kwargs)
    # Non-default BN statistics and biases, so a buffer or bias lost on the way changes the logits.
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("weight"):
                tensor.copy_(
                    torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor)
                )
    return model.eval()


def sample_input(model: torch.nn.Module, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))


def tiny_png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 3), (200, 30, 30)).save(path)
    return path


def yaml_header(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---", 2)[1])


# ----------------------------------------------------------------------------------------------- local folders
@pytest.mark.parametrize("key", list(STUDENTS))
def test_save_then_both_loaders_reproduce_logits(key, tmp_path):
    model = make_student(key)
    x = sample_input(model)
    with torch.no_grad():
        expected = model(x)
    folder = save_student(model, tmp_path / key)

    config = json.loads((folder / "config.json").read_text())
    assert "num_classes" not in config["model_args"]  # transformers passes it itself
    assert config["model_args"] == json.loads(json.dumps(model.model_args))
    assert config["num_classes"] == model.num_classes
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    with torch.no_grad():
        by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert torch.equal(by_timm(x), expected)
        assert by_timm.model_args == model.model_args
        by_transformers = AutoModelForImageClassification.from_pretrained(folder).eval()
        assert type(by_transformers).__name__ == "TimmWrapperForImageClassification"
        assert torch.equal(by_transformers(pixel_values=x).logits, expected)
        assert torch.equal(load_student(folder).eval()(x), expected)


def test_plain_timm_model_export_drops_num_classes_from_model_args(tmp_path):
    # The pitfall: timm 1.0.31 records num_classes among model_args, and transformers then gets it twice.
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7).eval()
    assert "num_classes" in model._model_args
    folder = save_student(model, tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {})
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=x).logits
        assert torch.equal(logits, model(x))


def test_save_unwraps_transformers_wrapper_and_resaves_identically(tmp_path):
    model = make_student("mnist_cnn")
    first = save_student(model, tmp_path / "a")
    wrapper = AutoModelForImageClassification.from_pretrained(first)
    second = save_student(wrapper, tmp_path / "b")
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_card_states_given_facts_and_yaml_parses(tmp_path):
    model = make_student("cifar_resnet8")
    widths = {"stages.0.0.conv1": [16, 5], "stages.1.0.conv1": [32, 7], "stages.2.0": "removed"}
    card = {
        "method": "search",
        "teacher": "cifar_resnet56",
        "dataset": "uoft-cs/cifar100",
        "metrics": {"top1": 68.25, "top5": 90.5},
        "widths": widths,
        "target_flops_ratio": 0.25,
        "command": "accelerate launch recipes/cifar100.py --method search --target_flops_ratio 0.25",
        "notes": "Searched on a 10-class subset.",
        "label_names": [f"class_{i}" for i in range(10)],
    }
    plot = tiny_png(tmp_path / "widths.png")
    summary = tmp_path / "search_summary.json"
    summary.write_text("{}")
    folder = save_student(model, tmp_path / "student", card=card, files=[plot, summary])
    text = (folder / "README.md").read_text()

    flops = count_flops(model, input_size=(3, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    assert f"{flops:,}" in text and f"{params:,}" in text
    assert "`cifar_resnet56`" in text and "L1 architecture gates" in text and "2001.11612" in text
    assert "25% of the teacher's FLOPs" in text
    assert '"stages.1.0.conv1": [32, 7]' in text and '"stages.2.0": "removed"' in text
    assert card["command"] in text and card["notes"] in text
    assert "![widths](widths.png)" in text and "(search_summary.json)" in text
    assert (folder / "widths.png").read_bytes() == plot.read_bytes()
    assert f"local-dir:{folder}" in text and "AutoModelForImageClassification.from_pretrained" in text
    for package in ("torch", "transformers", "timm", "hf_kdsearch"):
        assert f"| {package} | " in text

    meta = yaml_header(text)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"hf_kdsearch", "knowledge-distillation", "image-classification"} <= set(meta["tags"])
    assert meta["datasets"] == ["uoft-cs/cifar100"]
    metrics = {m["name"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["top1"]["value"] == 68.25 and metrics["top1"]["type"] == "accuracy"
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"

    # class names reach transformers' id2label
    assert AutoModelForImageClassification.from_pretrained(folder).config.id2label[3] == "class_3"


def test_card_given_numbers_win_and_missing_accuracy_is_said(tmp_path):
    model = make_student("mnist_mlp")
    text = (save_student(model, tmp_path / "s", card={"flops": 123456, "params": 789}) / "README.md").read_text()
    assert "123,456" in text and "| Parameters | 789 |" in text
    assert "| Accuracy | not measured |" in text
    assert "model-index" not in yaml_header(text)


def test_card_accuracy_shorthand_and_extra_keys(tmp_path):
    card = {"accuracy": 0.9812, "ensemble": "student 2 of 5", "stage_widths": [6, 12, 25]}
    text = (save_student(make_student("mnist_mlp"), tmp_path / "s", card=card) / "README.md").read_text()
    assert "| ensemble | student 2 of 5 |" in text and "| stage_widths | [6, 12, 25] |" in text
    metric = yaml_header(text)["model-index"][0]["results"][0]["metrics"][0]
    assert metric == {"type": "accuracy", "value": 0.9812, "name": "accuracy"}


def test_card_shows_kd_settings_teacher_accuracy_and_version(tmp_path):
    card = {
        "teacher": "cifar_resnet56",
        "teacher_accuracy": {"top1": 72.3, "top5": 92.1},
        "temperature": 4,
        "alpha": 0.9,
        "metrics": {"top1": 70.1},
    }
    text = (save_student(make_student("mnist_mlp"), tmp_path / "s", card=card) / "README.md").read_text()
    assert "| Teacher accuracy | top1 72.3, top5 92.1 |" in text
    assert "| Temperature | T = 4 |" in text and "| Alpha | 0.9 (weight of the KD term" in text
    version = importlib.metadata.version("hf_kdsearch")
    assert f"exported by hf_kdsearch {version} in timm's format" in text and f"| hf_kdsearch | {version} |" in text
    # The teacher's numbers are not the student's: the model-index holds only the student's metric.
    assert [m["value"] for m in yaml_header(text)["model-index"][0]["results"][0]["metrics"]] == [70.1]
    text = save_student(make_student("mnist_mlp"), tmp_path / "n", card={"teacher_accuracy": 0.5}) / "README.md"
    assert "| Teacher accuracy | 0.5 |" in text.read_text()

    # Every documented key is rendered by its own rule, none falls through to the "other facts" rows.
    every = {**card, "method": "kd", "dataset": "d", "accuracy": 0.7, "flops": 10, "params": 5, "widths": [1]}
    every |= {"target_flops_ratio": 0.5, "command": "c", "notes": "n", "license": "mit", "tags": ["t"]}
    every |= {"label_names": [str(i) for i in range(10)], "hardware": "h"}
    assert set(every) == set(CARD_KEYS)
    text = (save_student(make_student("mnist_mlp"), tmp_path / "all", card=every) / "README.md").read_text()
    summary_table = text.split("|---|---|\n")[1].split("\n\n")[0]
    assert "| Accuracy | 0.7 |" in summary_table and not [k for k in CARD_KEYS if f"| {k} |" in summary_table]
    for bad, match in (({"temperature": 0}, "temperature.*> 0"), ({"alpha": 1.5}, r"alpha.*\[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            save_student(make_student("mnist_mlp"), tmp_path / "bad", card=bad)


def test_bad_inputs_raise_clear_errors(tmp_path):
    model = make_student("mnist_mlp")
    with pytest.raises(ValueError, match="metrics"):
        save_student(model, tmp_path / "a", card={"metrics": 0.9})
    with pytest.raises(ValueError, match=r"target_flops_ratio.*1\.5"):
        save_student(model, tmp_path / "a", card={"target_flops_ratio": 1.5})
    with pytest.raises(FileNotFoundError, match="nope.png"):
        save_student(model, tmp_path / "a", files=[tmp_path / "nope.png"])

    # Changed after construction without updating model_args: the export would not load, so saving refuses.
    changed = make_student("mnist_mlp")
    changed.fc = torch.nn.Linear(19, 10, bias=False)
    with pytest.raises(ValueError, match=r"would not rebuild.*missing \['fc.bias'\]"):
        save_student(changed, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # checked before anything is written

    # A gated search model has gate parameters the architecture does not: extract the student first.
    gated = hf_kdsearch.add_gates(make_student("mnist_mlp"))
    with pytest.raises(ValueError, match=r"would not rebuild.*extract_student"):
        save_student(gated, tmp_path / "gated")
    student = hf_kdsearch.extract_student(gated, threshold=0.0)
    x = sample_input(student)
    with torch.no_grad():
        assert torch.equal(load_student(save_student(student, tmp_path / "extracted")).eval()(x), student.eval()(x))

    # Not built by timm.create_model: no architecture name to write.
    from hf_kdsearch.models.mnist import MLP

    with pytest.raises(ValueError, match=r"timm.create_model.*'hidden_dims': \[8\]"):
        save_student(MLP(hidden_dims=(8,)), tmp_path / "c")

    with pytest.raises(FileNotFoundError, match="no student folder"):
        load_student(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------- atomic saves
def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A disk that fills up: writes past `nbytes` in one file fail with EFBIG (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_resave_leaves_the_previous_folder_unchanged(tmp_path, monkeypatch):
    old, new = make_student("mnist_cnn", seed=0), make_student("mnist_cnn", seed=1)
    x = sample_input(old)
    folder = save_student(old, tmp_path / "student", card={"notes": "old"})
    before = folder_bytes(folder)

    # The disk fills up while the weights are written, after the config (new class names) is out: a mixed folder
    # would load the old weights under the new config without a word.
    labels = {"notes": "new", "label_names": [f"digit {i}" for i in range(10)]}
    with file_size_limit(len(before["model.safetensors"]) // 2), pytest.raises(Exception, match="File too large"):
        save_student(new, folder, card=labels)
    assert folder_bytes(folder) == before  # all old: no new config with old weights, no half-written file
    # An error after the weights are out: the card template cannot be read.
    with monkeypatch.context() as patch, pytest.raises(FileNotFoundError, match="no-template.md"):
        patch.setattr(hf_kdsearch.hub, "CARD_TEMPLATE", tmp_path / "no-template.md")
        save_student(new, folder, card={"notes": "new"})

    assert folder_bytes(folder) == before  # all old: no new config with old weights, no half-written file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary folder left beside it
    with torch.no_grad():
        assert torch.equal(load_student(folder).eval()(x), old.eval()(x))


def test_resave_replaces_the_student_keeps_other_files_and_cleans_stale_temporaries(tmp_path):
    old, new = make_student("mnist_mlp", seed=0), make_student("mnist_mlp", seed=1)
    x = sample_input(old)
    folder = save_student(old, tmp_path / "student", files=[tiny_png(tmp_path / "plot.png")])
    (folder / "my_notes.txt").write_text("mine")
    # What a save killed on this host leaves: a temporary folder named after a process that no longer runs.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".student.tmp-{socket.gethostname()}-{dead.pid}-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    save_student(new, folder, card={"notes": "second"})
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "student"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "my_notes.txt", "plot.png"]
    assert (folder / "my_notes.txt").read_text() == "mine" and "second" in (folder / "README.md").read_text()
    with torch.no_grad():
        assert torch.equal(load_student(folder).eval()(x), new.eval()(x))


def test_the_working_directory_is_not_replaced(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    for target in (".", str(tmp_path.parent)):
        with pytest.raises(ValueError, match="current working directory.*pass a subfolder"):
            save_student(make_student("mnist_mlp"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert (save_student(make_student("mnist_mlp"), "student") / "config.json").is_file()


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    model = make_student("mnist_mlp")
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
        model.fc.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite weights in fc.weight \(1 of 190\).*allow_non_finite=True"):
        save_student(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with pytest.raises(ValueError, match="NaN or infinite"):
        push_student(model, "user/nan")  # refused before the push, offline or not
    folder = save_student(model, tmp_path / "nan", allow_non_finite=True)
    assert torch.isnan(load_student(folder).fc.weight[0, 0])


# ----------------------------------------------------------------------------------------------- hub errors
def test_push_offline_saves_locally_first_and_names_the_folder(monkeypatch, tmp_path):
    # Local first, then the Hub: the failed push names the folder it saved, and that folder is the student.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = make_student("mnist_mlp")
    x = sample_input(model)
    with pytest.raises(HubUnavailableError, match=r"HF_HUB_OFFLINE is set.*student was saved to '([^']+)'") as info:
        push_student(model, "user/offline", card={"teacher": "t"})
    folder = re.search(r"student was saved to '([^']+)'", str(info.value)).group(1)
    assert f"hf upload user/offline {folder}" in str(info.value)
    with torch.no_grad():
        assert torch.equal(load_student(folder).eval()(x), model(x))
    assert "hf-hub:user/offline" in (Path(folder) / "README.md").read_text()
    shutil.rmtree(Path(folder).parent)

    # With save_directory the local copy goes where the caller says, and the error names it.
    with pytest.raises(HubUnavailableError, match=re.escape(str(tmp_path / "kept"))):
        push_student(model, "user/offline", save_directory=tmp_path / "kept")
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path / "kept").eval()(x), model(x))
    with pytest.raises(HubUnavailableError, match="HF_HUB_OFFLINE"):
        load_student("user/never-downloaded-student")


def test_push_to_unreachable_endpoint_names_hf_endpoint(monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(HubUnavailableError, match=rf"HF_ENDPOINT={endpoint} could not be reached.*student was saved"):
        push_student(make_student("mnist_mlp"), "user/unreachable", save_directory=tmp_path / "kept")


def push_in_thread(limit: float, **kwargs) -> tuple[BaseException | None, float]:
    """Run push_student in a daemon thread; fail the test if it has not returned after `limit` seconds."""
    outcome: dict = {}

    def push() -> None:
        started = time.monotonic()
        try:
            push_student(make_student("mnist_mlp"), "user/silent", **kwargs)
        except BaseException as err:  # noqa: B036 (handed to the test thread)
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"push_student had not returned after {limit} s: the push is not bounded")
    return outcome.get("error"), outcome["seconds"]


def test_push_to_a_server_that_never_answers_times_out(monkeypatch, tmp_path):
    # The server completes the TCP handshake (listen backlog) but never reads nor answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

        monkeypatch.setenv("HF_KDSEARCH_PUSH_TIMEOUT", "1")  # the environment sets the default
        error, seconds = push_in_thread(30)
        assert isinstance(error, HubUnavailableError), repr(error)
        assert re.search(rf"HF_ENDPOINT={endpoint} did not answer within 1 s.*HF_KDSEARCH_PUSH_TIMEOUT", str(error))
        folder = Path(re.search(r"student was saved to '([^']+)'", str(error)).group(1))
        assert (folder / "model.safetensors").is_file()
        shutil.rmtree(folder.parent)  # the temporary folder a failed push keeps
        assert seconds < 20

        error, seconds = push_in_thread(30, timeout=0.5, save_directory=tmp_path / "kept")  # the argument wins
        assert f"student was saved to {str(tmp_path / 'kept')!r}" in str(error)
        assert isinstance(error, HubUnavailableError) and "within 0.5 s" in str(error), repr(error)
        assert seconds < 20
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0, got 0"):
        push_student(make_student("mnist_mlp"), "user/x", timeout=0)


# ----------------------------------------------------------------------------------------------- push and pull
PUSH = """
import json, sys, torch
import hf_kdsearch
model = torch.load(sys.argv[1], weights_only=False)
card = json.loads(sys.argv[2])
url = hf_kdsearch.push_student(model, "user/tiny-student", card=card, files=[sys.argv[3]])
# A second push to the same repo: create_repo meets 409 (exist_ok) and the commit replaces the card.
again = hf_kdsearch.push_student(model, "user/tiny-student", card={**card, "notes": "second push"}, private=True)
print("URLS", url, again)
"""

PULL = """
import sys, timm, torch
import hf_kdsearch
from transformers import AutoModelForImageClassification
x = torch.load(sys.argv[1])
with torch.no_grad():
    out = {
        "timm": timm.create_model("hf-hub:user/tiny-student", pretrained=True).eval()(x),
        "transformers": AutoModelForImageClassification.from_pretrained("user/tiny-student").eval()(x).logits,
        "load_student": hf_kdsearch.load_student("user/tiny-student").eval()(x),
        "load_teacher": hf_kdsearch.load_teacher("user/tiny-student").eval()(x),
    }
    # A transformers repo loads through the same resolver, with the Auto class.
    pixels = torch.zeros(1, 3, 32, 32)
    out["hf_repo"] = {
        load.__name__: load("user/hf-resnet").eval()(pixel_values=pixels).logits
        for load in (hf_kdsearch.load_student, hf_kdsearch.load_teacher)
    }
try:
    hf_kdsearch.load_student("user/no-such-student")
except FileNotFoundError as err:
    out["missing"] = str(err)
torch.save(out, sys.argv[2])
"""


def run_python(code: str, *args, env: dict, timeout: float = 240) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.slow  # a subprocess run of the whole pipeline: CI's slow tier
def test_push_then_pull_through_loopback_hub(tmp_path):
    model = make_student("cifar_resnet8")
    x = sample_input(model)
    with torch.no_grad():
        expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    torch.save(x, tmp_path / "x.pt")
    plot = tiny_png(tmp_path / "widths.png")
    card = {"teacher": "cifar_resnet56", "method": "search", "metrics": {"top1": 61.5}, "widths": {"s0": [16, 5]}}

    with LoopbackHub(timeout=400) as hub:
        push_env = hub.env(tmp_path / "hf_push")
        (tmp_path / "tmpdir").mkdir()
        push_env["TMPDIR"] = str(tmp_path / "tmpdir")  # where push_student keeps its local copy
        out = run_python(PUSH, tmp_path / "model.pt", json.dumps(card), plot, env=push_env)
        assert not list((tmp_path / "tmpdir").glob("hf_kdsearch_push_*"))  # removed after the successful pushes
        assert out.split("URLS")[1].split() == [f"{hub.endpoint}/user/tiny-student"] * 2

        files = hub.files("user/tiny-student")
        assert sorted(files) == ["README.md", "config.json", "model.safetensors", "widths.png"]
        assert len(hub.commits("user/tiny-student")) == 3  # creation, first push, second push
        readme = files["README.md"].decode()
        assert "`cifar_resnet56`" in readme and "second push" in readme and '"s0": [16, 5]' in readme
        assert "hf-hub:user/tiny-student" in readme and "from_pretrained('user/tiny-student')" in readme
        assert yaml_header(readme)["model-index"][0]["results"][0]["metrics"][0]["value"] == 61.5
        assert "num_classes" not in json.loads(files["config.json"])["model_args"]
        assert files["widths.png"] == plot.read_bytes()

        # A fresh process with an empty cache downloads everything from the server.
        resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).eval()
        resnet.save_pretrained(tmp_path / "hf_resnet")
        hub.upload("user/hf-resnet", {p.name: p.read_bytes() for p in (tmp_path / "hf_resnet").iterdir()})
        run_python(PULL, tmp_path / "x.pt", tmp_path / "out.pt", env=hub.env(tmp_path / "hf_pull"))
        assert ("HEAD", "/user/tiny-student/resolve/main/model.safetensors") in hub.requests

    pulled = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        resnet_logits = resnet(pixel_values=torch.zeros(1, 3, 32, 32)).logits
    for loader, logits in pulled.pop("hf_repo").items():
        assert torch.equal(logits, resnet_logits), loader
    assert re.search(
        rf"'user/no-such-student'.*Hub at HF_ENDPOINT={hub.endpoint} has no such model repo", pulled.pop("missing")
    )
    for loader, logits in pulled.items():
        assert torch.equal(logits, expected), loader
    assert not hub.running


def test_loopback_hub_stops_itself(tmp_path):
    hub = LoopbackHub(timeout=0.3).start()
    assert hub.endpoint.startswith("http://127.0.0.1:")
    hub.upload("user/seeded", {"a.txt": b"hello"})
    assert hub.files("user/seeded") == {"a.txt": b"hello"}
    hub._timer.join(5)
    assert not hub.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(hub.endpoint.rsplit(":", 1)[1])), timeout=1).close()


# ----------------------------------------------------------------------------------------------- load_teacher
def test_load_teacher_from_save_student_folder(tmp_path):
    model = make_student("mnist_cnn")
    folder = save_student(model, tmp_path / "teacher")
    x = sample_input(model)
    with torch.no_grad():
        assert torch.equal(load_teacher(str(folder)).eval()(x), model(x))


def test_load_teacher_from_transformers_folder(tmp_path):
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5
    )
    torch.manual_seed(0)
    model = ResNetForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "hf_teacher")
    teacher = load_teacher(str(tmp_path / "hf_teacher")).eval()
    assert isinstance(teacher, ResNetForImageClassification)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher(pixel_values=x).logits, model(pixel_values=x).logits)


def test_load_teacher_errors_are_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherLoadError, match=r"'someone/teacher-not-cached'.*HF_HUB_OFFLINE is set.*local folder"):
        load_teacher("someone/teacher-not-cached")
    with pytest.raises(TeacherLoadError, match="timm has no pretrained weights for 'cifar_resnet56'"):
        load_teacher("cifar_resnet56")
    with pytest.raises(TeacherLoadError, match="no teacher folder at"):
        load_teacher(str(tmp_path / "not-here"))
    # Errors that are not about the Hub keep their own type (the model is built before any download is tried).
    with pytest.raises(TypeError, match="not_an_argument"):
        load_teacher("test_resnet", not_an_argument=1)


def test_package_exports_the_hub_module_api():
    # Every public name of hub.py is reachable from the package root, as the same object.
    public = set(hf_kdsearch.hub.__all__) - {"CARD_KEYS"}
    assert public <= set(hf_kdsearch.__all__)
    assert all(getattr(hf_kdsearch, name) is getattr(hf_kdsearch.hub, name) for name in public)
