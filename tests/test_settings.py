"""Each setting has one home: one stated default, in one arguments class, and no public function restates it."""

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
from transformers import Trainer, TrainingArguments

import hf_kdsearch
from hf_kdsearch import DataPathArguments, DistillationArguments, OnlineEnsembleArguments
from hf_kdsearch.config import upcast_arguments

CLASSES = (DataPathArguments, DistillationArguments, OnlineEnsembleArguments)


def own_fields(cls: type) -> set[str]:
    """The fields `cls` states itself (with their default), not those it inherits."""
    return set(vars(cls).get("__annotations__", {}))


def knobs() -> dict[str, list[type]]:
    """Every setting the package adds to `TrainingArguments`, with the classes that state a default for it."""
    homes: dict[str, list[type]] = {}
    for cls in CLASSES:
        for name in own_fields(cls):
            homes.setdefault(name, []).append(cls)
    return homes


def public_callables():
    """(qualified name, callable) of every public function, class constructor and method in hf_kdsearch."""
    seen = set()
    for info in pkgutil.walk_packages(hf_kdsearch.__path__, "hf_kdsearch."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__ or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj) and not dataclasses.is_dataclass(obj):
                for attr, member in vars(obj).items():
                    if attr == "__init__" or not attr.startswith("_"):
                        member = member.__func__ if isinstance(member, classmethod | staticmethod) else member
                        if inspect.isfunction(member):
                            yield f"{module.__name__}.{name}.{attr}", member


def test_each_knob_has_one_stated_default():
    homes = knobs()
    assert {"temperature", "alpha", "device_augment", "ce_weight", "image_mean"} <= set(homes)
    # A field is stated once: in DataPathArguments for both trainers, else in the one class it belongs to.
    stated_twice = {n: [c.__name__ for c in cs] for n, cs in homes.items() if len(cs) > 1 and n != "temperature"}
    assert stated_twice == {}
    # temperature is two knobs: KD's T (4, Hinton et al.) and the ensemble's T (2, Walawalkar et al.), one per sibling.
    assert sorted(c.__name__ for c in homes["temperature"]) == ["DistillationArguments", "OnlineEnsembleArguments"]
    assert not issubclass(OnlineEnsembleArguments, DistillationArguments)
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert not set(homes) & base, "a knob shadows a TrainingArguments field"


def test_no_public_function_restates_a_knobs_default():
    homes = knobs()
    restated = []
    for qualname, fn in public_callables():
        for p in inspect.signature(fn).parameters.values():
            if p.name in homes and p.default is not inspect.Parameter.empty:
                restated.append(f"{qualname}({p.name}={p.default!r})")
    assert restated == []


def test_no_trainer_reads_a_setting_with_a_fallback_default():
    import pathlib

    source = pathlib.Path(hf_kdsearch.__file__).parent
    hits = []
    for path in source.rglob("*.py"):
        text = path.read_text()
        hits += [f"{path.name}: _arg(" for _ in range(text.count("_arg("))]
        for name in knobs():
            if f'getattr(args, "{name}", ' in text or f'getattr(self.args, "{name}", ' in text:
                hits.append(f"{path.name}: getattr(args, {name!r}, ...)")
    assert hits == []


@pytest.mark.parametrize("cls", CLASSES)
def test_plain_training_arguments_are_upcast_once_keeping_every_field(tmp_path, cls):
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=0.01, seed=7, report_to="none", hub_token="x")
    up = upcast_arguments(plain, cls)
    assert type(up) is cls
    assert (up.learning_rate, up.seed, up.output_dir, up.hub_token) == (0.01, 7, str(tmp_path), "x")
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in knobs()}
    assert {n: getattr(up, n) for n in defaults} == defaults
    assert upcast_arguments(up, cls) is up
    assert type(upcast_arguments(None, cls)) is cls


def test_a_siblings_settings_are_refused_by_name(tmp_path):
    kd = DistillationArguments(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(TypeError, match="alpha, check_teacher_accuracy"):
        upcast_arguments(kd, OnlineEnsembleArguments)
    assert upcast_arguments(kd, DataPathArguments) is kd  # a subclass carries the base's settings


def test_trainers_name_their_arguments_class():
    from hf_kdsearch import ClassificationTrainer, DistillationTrainer, OnlineEnsembleTrainer

    assert issubclass(ClassificationTrainer, Trainer)
    assert ClassificationTrainer.args_class is DataPathArguments
    assert DistillationTrainer.args_class is DistillationArguments
    assert OnlineEnsembleTrainer.args_class is OnlineEnsembleArguments
