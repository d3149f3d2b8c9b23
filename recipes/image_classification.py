"""Distil on any image-classification dataset from the Hub or a local copy: KD, UNIX, student search, online ensembles.

    python recipes/image_classification.py --method kd --teacher runs/teacher --student resnet18 \\
        --dataset_path data/my_photos --image_size 160 --num_train_epochs 30 --output_dir runs/kd_photos

    accelerate launch --multi_gpu --num_processes 8 recipes/image_classification.py --method kd \\
        --teacher timm/resnet50.a1_in1k --student resnet18 --dataset_name ILSVRC/imagenet-1k --streaming \\
        --max_steps 100000 --per_device_train_batch_size 128 --output_dir runs/kd_in1k

Any dataset with an image column and an integer label column works: images of any size, RGB or greyscale (converted
to what the student takes), `ClassLabel` or plain integer labels, a `train` split plus a `validation` or `test` one
(or `--validation_split_percentage`). The four methods and their flags are those of `recipes/cifar100.py`.

Data paths (the recipe prints which one it took):
- **transforms**: images are decoded and transformed on the fly (`Dataset.with_transform`), in the DataLoader
  workers (`--dataloader_num_workers`), with timm's training and evaluation transforms built from the student's data
  config (`timm.data.resolve_data_config` / `create_transform`; `--image_processor` takes a transformers image
  processor's statistics and size instead). `--image_size` overrides the resolution.
- **fast**: small images of one size (at most 64 px a side, e.g. CIFAR, MNIST) and a dataset that fits
  `--fast_path_max_bytes` are decoded once into uint8 tensors, kept on the GPU and augmented there (random crop with
  4-pixel padding, flip), as in the CIFAR recipe. `--loader fast|transforms` forces a path.
- **streaming** (`--streaming`): the training split is read as a stream, shuffled in a buffer, split across ranks with
  `datasets.distributed.split_dataset_by_node` and decoded on the fly; training length is `--max_steps`. The first
  `--max_eval_samples` (default 2,000) of the evaluation split are held in memory for evaluation.

Teacher at another resolution: when the teacher's timm `pretrained_cfg` input size differs from the student's, each
batch is resized for the teacher on the device (`DistillationArguments.teacher_image_size`), once, from the same
decoded images; its mean/std are matched by re-normalising the batch. `--teacher_image_size` sets it by hand.

Outputs: `<output_dir>/student` (`student0..S-1` for the ensemble), loadable by
`timm.create_model("local-dir:...", pretrained=True)` and `AutoModelForImageClassification.from_pretrained`. Its
`pretrained_cfg` records the input size and statistics it was trained with.

Evidence: none on a real dataset yet. Written and tested on CPU without Hub access; the tests
(`tests/test_image_recipe.py`) run every method for a few steps on an image folder of MNIST digits of mixed sizes and
modes, and a 2-process streaming run. No accuracy is claimed here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field

import timm
import torch
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipe_common as common  # noqa: E402
from recipe_common import METHODS, RecipeData, RecipeError  # noqa: E402

from hf_kdsearch import DistillationArguments, load_student, load_teacher  # noqa: E402
from hf_kdsearch.data import (  # noqa: E402
    ImageClassificationTransform,
    class_names,
    collate_tensor_batch,
    data_config_for,
    find_columns,
    image_sizes,
    image_transforms,
    load_image_dataset,
    split_stream_by_node,
    to_uint8_tensors,
)
from hf_kdsearch.fastpath import DeviceImageDataset  # noqa: E402

TAG = "image_classification"
EVAL_SPLITS = ("validation", "test", "valid", "val")
LOADERS = ("auto", "fast", "transforms")
#: The fast path's "small": the largest side it takes automatically (CIFAR, MNIST, SVHN, Tiny-ImageNet).
FAST_PATH_MAX_SIDE = 64


@dataclass
class RecipeArguments:
    """What the recipe adds to `DistillationArguments`."""

    method: str = field(default="kd", metadata={"help": f"One of {METHODS}.", "choices": METHODS})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local folder, a Hub id (user/repo, hf-hub:...), a timm name with pretrained weights, "
            "or a timm architecture without weights, which is trained first (stage 1) and cached. Not used by "
            "--method ensemble."
        },
    )
    student: str | None = field(
        default=None,
        metadata={
            "help": "Student: a timm architecture (default resnet18; cifar_resnet20 for the ensemble, which needs a "
            "CIFAR architecture) or a local folder of a trained student to continue from. Not used by --method "
            "search, which finds its student."
        },
    )
    pretrained_student: bool = field(
        default=False, metadata={"help": "Start the student from timm's pretrained weights (new classifier head)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. beans or food101."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if several."})
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "A local copy instead: parquet file(s), a save_to_disk folder, or an image folder."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Default: the first Image column."})
    label_column: str | None = field(
        default=None,
        metadata={"help": "Default: the first ClassLabel column, else an integer column named label, labels, ..."},
    )
    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes, for a stream with plain integer labels (no ClassLabel names)."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": f"Split to evaluate on. Default: the first of {EVAL_SPLITS} that exists."}
    )
    validation_split_percentage: float | None = field(
        default=None,
        metadata={"help": "Without an evaluation split: hold out this percentage of the training split (seeded)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation samples (streaming default: 2000)."}
    )
    image_size: list[int] | None = field(
        default=None,
        metadata={"help": "Student input size, one int or height width. Default: the student's timm data config."},
    )
    image_processor: str | None = field(
        default=None,
        metadata={
            "help": "A transformers image processor (folder or Hub id) whose mean, std and size the transforms use "
            "instead of the student's timm data config."
        },
    )
    train_augment: bool = field(
        default=True,
        metadata={"help": "Random training augmentation (timm's); false trains on the evaluation transform."},
    )
    loader: str = field(
        default="auto",
        metadata={
            "help": "auto: the fast path (uint8 on the device) for small images of one size, else transforms on the "
            "fly. fast / transforms force one.",
            "choices": LOADERS,
        },
    )
    fast_path_max_bytes: int = field(
        default=4 * 2**30, metadata={"help": "auto picks the fast path only for datasets up to this many bytes."}
    )
    data_on_device: bool = field(
        default=True,
        metadata={"help": "Fast path: keep the uint8 dataset on the GPU (else in pinned host memory)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the training split (IterableDataset, split across ranks); needs --max_steps."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Streaming: shuffle buffer, in samples."})
    lr_decay_at: list[float] | None = field(
        default=None,
        metadata={
            "help": "Step decay points, as fractions of each stage's optimizer steps (e.g. 0.625 0.75 0.875). "
            "Default: the Trainer's --lr_scheduler_type (cosine); 0.57 0.86 for --method ensemble unless "
            "--lr_scheduler_type is given."
        },
    )
    lr_decay_factor: float = field(default=0.1, metadata={"help": "Learning-rate factor at each decay point."})
    adam_l2: bool = field(
        default=False,
        metadata={
            "help": "Train with torch.optim.Adam, whose weight decay is an L2 term added to the gradient (coupled), "
            "instead of --optim; --learning_rate, --weight_decay, --adam_beta1/2 and --adam_epsilon set it. Default "
            "for --method ensemble (its authors' optimizer); an explicit --optim turns it off."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where stage 1 caches the trained teacher. Default <output_dir>/teacher-<name>."},
    )
    teacher_epochs: float | None = field(
        default=None, metadata={"help": "Stage-1 epochs. Default: --num_train_epochs."}
    )
    teacher_max_steps: int | None = field(default=None, metadata={"help": "Stage-1 steps. Default: --max_steps."})
    select_ratio: float = field(default=0.75, metadata={"help": "unix: share of each batch the teacher sees."})
    uncertainty: str = field(default="entropy", metadata={"help": "unix: entropy, least_confidence, margin, random."})
    mixup: bool = field(default=True, metadata={"help": "unix: mix confident samples by rank."})
    target_flops_ratio: float = field(default=0.25, metadata={"help": "search: FLOPs budget relative to the teacher."})
    l1_weight: float = field(default=1.0, metadata={"help": "search: initial weight of the gate L1 penalty."})
    search_epochs: float = field(default=10, metadata={"help": "search: epochs of the search phase."})
    search_max_steps: int | None = field(default=None, metadata={"help": "search: steps. Default: --max_steps."})
    num_students: int = field(default=5, metadata={"help": "ensemble: number of students S."})
    resume: bool = field(default=False, metadata={"help": "Resume each stage from its last checkpoint, if any."})


#: General defaults for a dataset of unknown size (our choice): the papers' optimiser and loss settings, 30 epochs
#: with a cosine schedule. Set your own length with --num_train_epochs or --max_steps.
COMMON_DEFAULTS = dict(
    per_device_train_batch_size=64,
    per_device_eval_batch_size=128,
    learning_rate=0.05,
    weight_decay=5e-4,
    optim="sgd",
    optim_args="momentum=0.9",
    num_train_epochs=30,
    lr_scheduler_type="cosine",
    warmup_steps=0,
    # The papers do not clip; the Trainer's 1.0 would clip most KD steps (T^2-scaled gradients) and few CE steps.
    max_grad_norm=0.0,
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=1,
    logging_steps=50,
    report_to="none",
    remove_unused_columns=False,
    dataloader_num_workers=min(4, os.cpu_count() or 1),
    channels_last=True,
    logging_nan_inf_filter=False,
    ddp_find_unused_parameters=False,
)
METHOD_DEFAULTS = {
    "kd": dict(alpha=0.9, temperature=4.0),
    "unix": dict(alpha=1.0, temperature=4.0),
    "search": dict(alpha=0.9, temperature=4.0),
    "ensemble": dict(common.ENSEMBLE_DEFAULTS),
}


def parse_args(argv: list[str] | None) -> tuple[RecipeArguments, DistillationArguments, dict]:
    """Parse the command line with the method's defaults; returns the hub request separately."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="kd", choices=METHODS)
    method = pre.parse_known_args(argv)[0].method

    parser = HfArgumentParser((RecipeArguments, DistillationArguments))
    cuda = torch.cuda.is_available()
    parser.set_defaults(
        **{**COMMON_DEFAULTS, "bf16": cuda and torch.cuda.is_bf16_supported(), **METHOD_DEFAULTS[method]}
    )

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if not given("--output_dir"):
        argv += ["--output_dir", f"runs/image_{method}"]
    recipe, args = parser.parse_args_into_dataclasses(argv)
    if given("--lr_scheduler_type") and not given("--lr_decay_at"):
        recipe.lr_decay_at = None  # an explicit Trainer schedule replaces the method's default step decay
    recipe.step_decay = recipe.lr_decay_at is not None
    if given("--optim") and not given("--adam_l2"):
        recipe.adam_l2 = False  # an explicit Trainer optimizer replaces the method's default Adam
    if recipe.student is None:
        recipe.student = "cifar_resnet20" if method == "ensemble" else "resnet18"
    if method != "ensemble" and not recipe.teacher:
        parser.error(f"--method {method} needs --teacher (a folder, a Hub id or a timm name)")
    if not (recipe.dataset_name or recipe.dataset_path):
        parser.error("pass --dataset_name (a Hub id, e.g. beans) or --dataset_path (a local copy)")
    if recipe.streaming and args.max_steps <= 0:
        parser.error("--streaming reads a stream without a known length: give the training length as --max_steps")
    if recipe.streaming and recipe.loader == "fast":
        parser.error("--loader fast holds the whole dataset in memory; it does not stream")
    if recipe.validation_split_percentage is not None and not 0 < recipe.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must lie in (0, 100), got {recipe.validation_split_percentage}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id user/name")
    hub = {"push": args.push_to_hub, "repo_id": args.hub_model_id, "token": args.hub_token}
    hub["private"] = args.hub_private_repo
    # The Trainer would push checkpoints in its own format; the recipe pushes the final student itself.
    args = dataclasses.replace(args, push_to_hub=False)
    return recipe, args, hub


# ---- data -----------------------------------------------------------------------------------------------------------
def load_splits(recipe: RecipeArguments, args):
    """`(train, eval, eval split name)`: raw `datasets` splits, the training one a stream with `--streaming`."""
    splits = load_image_dataset(
        recipe.dataset_name, recipe.dataset_path, config=recipe.dataset_config, streaming=recipe.streaming
    )
    if recipe.train_split not in splits:
        raise RecipeError(f"the dataset has no split {recipe.train_split!r}; it has {sorted(splits)}")
    train = splits[recipe.train_split]
    eval_split = recipe.eval_split or next((s for s in EVAL_SPLITS if s in splits), None)
    if recipe.eval_split is not None and eval_split not in splits:
        raise RecipeError(f"the dataset has no split {eval_split!r}; it has {sorted(splits)}")
    if eval_split is None:
        if recipe.validation_split_percentage is None or recipe.streaming:
            fix = (
                "give --eval_split one of them; a stream cannot hold out a percentage of its training split"
                if recipe.streaming
                else f"pass --validation_split_percentage 10 to hold out 10 % of {recipe.train_split!r}, or "
                "--eval_split NAME"
            )
            raise RecipeError(f"the dataset has no evaluation split (it has {sorted(splits)}): {fix}")
        held = train.train_test_split(test_size=recipe.validation_split_percentage / 100, seed=args.seed)
        train, evaluation = held["train"], held["test"]
        eval_split = f"{recipe.validation_split_percentage:g} % of {recipe.train_split} held out"
    else:
        evaluation = splits[eval_split]
    recipe.eval_split = eval_split
    if recipe.streaming:
        import datasets

        n = recipe.max_eval_samples or 2000
        # Evaluation needs a fixed set on every rank: the first n examples, held in memory.
        evaluation = datasets.Dataset.from_list(list(evaluation.take(n)), features=evaluation.features)
        if recipe.max_train_samples is not None:
            train = train.take(recipe.max_train_samples)
    else:
        if recipe.max_train_samples is not None:
            train = train.select(range(min(recipe.max_train_samples, len(train))))
        if recipe.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(recipe.max_eval_samples, len(evaluation))))
    return train, evaluation


def label_set(recipe, train, evaluation, label_column: str) -> tuple[int, list[str] | None]:
    """The number of classes and their names; plain integer labels are checked to be >= 0."""
    names = class_names(train.features, label_column)
    if names is not None:
        num = len(names)
        if recipe.num_labels is not None and recipe.num_labels != num:
            raise RecipeError(f"--num_labels {recipe.num_labels} but {label_column!r} names {num} classes")
        return num, names
    seen = list(evaluation[label_column]) + ([] if recipe.streaming else list(train[label_column]))
    if min(seen) < 0:
        raise RecipeError(
            f"the label column {label_column!r} holds negative labels (min {min(seen)}), e.g. -1 for unlabelled "
            "test images: evaluate on another split (--eval_split) or hold out part of train "
            "(--validation_split_percentage)"
        )
    if recipe.num_labels is not None:
        if max(seen) >= recipe.num_labels:
            raise RecipeError(f"--num_labels {recipe.num_labels} but {label_column!r} holds label {max(seen)}")
        return recipe.num_labels, None
    if recipe.streaming:
        raise RecipeError(
            f"the label column {label_column!r} holds plain integers, and a stream's largest label is unknown before "
            "reading it all: pass --num_labels"
        )
    return max(seen) + 1, None


def load_raw(recipe: RecipeArguments, args) -> tuple:
    """`(train, eval, image column, label column, number of classes, class names)`, before any decoding."""
    train, evaluation = load_splits(recipe, args)
    try:
        image_column, label_column = find_columns(train.features, recipe.image_column, recipe.label_column)
    except ValueError as err:
        raise RecipeError(str(err)) from err
    num_classes, names = label_set(recipe, train, evaluation, label_column)
    return train, evaluation, image_column, label_column, num_classes, names


def choose_path(recipe, train, evaluation, image_column: str, data_config: dict) -> tuple[str, str]:
    """`("fast" | "transforms", why)`."""
    if recipe.streaming:
        return "transforms", "streaming"
    if recipe.loader == "transforms":
        return "transforms", "--loader transforms"
    sizes = image_sizes(train, image_column) | image_sizes(evaluation, image_column)
    (w, h) = next(iter(sizes))
    channels = data_config["input_size"][0]
    nbytes = (len(train) + len(evaluation)) * channels * h * w
    wanted = None if recipe.image_size is None else tuple(data_config["input_size"][1:])
    problems = []
    if len(sizes) > 1:
        lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        problems.append(f"images come in {len(sizes)} sizes, from {lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}")
    elif wanted is not None and wanted != (h, w):
        problems.append(f"--image_size {wanted[0]}x{wanted[1]} differs from the images' {h}x{w}")
    if recipe.loader == "fast":
        if problems:
            raise RecipeError(f"--loader fast needs images of one size, trained at that size: {problems[0]}")
        return "fast", "--loader fast"
    if len(sizes) == 1 and max(h, w) > FAST_PATH_MAX_SIDE:
        problems.append(f"{h}x{w} images are larger than the fast path's {FAST_PATH_MAX_SIDE} px")
    if nbytes > recipe.fast_path_max_bytes:
        problems.append(f"{nbytes / 2**30:.1f} GiB decoded exceeds --fast_path_max_bytes")
    if problems:
        return "transforms", "; ".join(problems)
    return "fast", f"all {len(train) + len(evaluation)} images are {h}x{w} ({nbytes / 2**20:.1f} MiB as uint8)"


def load_data(recipe: RecipeArguments, args, student: torch.nn.Module, raw) -> tuple[RecipeData, DistillationArguments]:
    """The run's data on the path `choose_path` picks, with the inputs `student` expects, and `args` set for that
    path. `raw` is what `load_raw` returned."""
    train, evaluation, image_column, label_column, num_classes, names = raw
    processor = None
    if recipe.image_processor:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(recipe.image_processor)
    data_config = data_config_for(student, image_size=recipe.image_size, processor=processor)
    channels = data_config["input_size"][0]
    path, why = choose_path(recipe, train, evaluation, image_column, data_config)
    description = recipe.dataset_name or f"local copy at {recipe.dataset_path}"
    if recipe.dataset_name and recipe.dataset_path:
        description = f"local copy of {recipe.dataset_name} at {recipe.dataset_path}"

    if path == "fast":
        out = []
        for split, ds in (("train", train), ("eval", evaluation)):
            tensors, _ = to_uint8_tensors(ds, image_column, label_column, channels=channels, desc=f"decoding {split}")
            on_gpu = args.device.type == "cuda" and recipe.data_on_device
            out.append(
                DeviceImageDataset.from_dataset(tensors, device=args.device if on_gpu else None, pin_memory=True)
            )
        input_size = tuple(out[0].images.shape[1:])
        data_config = {**data_config, "input_size": input_size}
        # A batch is one gather: worker processes would only add copies (and cannot share CUDA tensors).
        changes = dict(device_augment=True, image_mean=list(data_config["mean"]), image_std=list(data_config["std"]))
        changes.update(dataloader_num_workers=0)
        if on_gpu:
            changes.update(dataloader_pin_memory=False)  # the data already lives on the GPU: nothing to pin
        args = dataclasses.replace(args, **changes)
        where = f"uint8 tensors on {out[0].device}, augmented there (crop with 4-pixel padding, flip)"
        collator = DeviceImageDataset.collate
        train, evaluation = out
    else:
        train_tf, eval_tf = image_transforms(data_config, train_augment=recipe.train_augment)
        mode = "RGB" if channels == 3 else "L"
        train_fn = ImageClassificationTransform(train_tf, image_column, label_column, mode)
        eval_fn = ImageClassificationTransform(eval_tf, image_column, label_column, mode)
        evaluation = evaluation.select_columns([image_column, label_column]).with_transform(eval_fn)
        if recipe.streaming:
            columns = list(train.features)
            train = train.shuffle(seed=args.seed, buffer_size=recipe.shuffle_buffer_size)
            train = train.map(train_fn, batched=True, remove_columns=columns)
            train = split_stream_by_node(train, rank=args.process_index, world_size=args.world_size)
        else:
            train = train.select_columns([image_column, label_column]).with_transform(train_fn)
        input_size = tuple(data_config["input_size"])
        size = f"{input_size[1]}x{input_size[2]}"
        where = (
            f"decoded on the fly in {args.dataloader_num_workers} DataLoader worker(s), timm transforms at {size}"
            + (f", stream split across {args.world_size} rank(s)" if recipe.streaming else "")
        )
        collator = collate_tensor_batch
    log(args, f"data path: {path} ({where}): {why}")
    data = RecipeData(
        train=train,
        eval=evaluation,
        collator=collator,
        num_classes=num_classes,
        class_names=names,
        input_size=input_size,
        path=path,
        data_config=data_config,
        description=description,
    )
    return data, args


# ---- models ---------------------------------------------------------------------------------------------------------
def build_student(recipe: RecipeArguments, num_classes: int | None) -> torch.nn.Module:
    """The student named by `--student`: a timm architecture (built with `num_classes`) or a trained folder."""
    if os.path.isdir(recipe.student):
        return load_student(recipe.student)
    if not timm.is_model(recipe.student):
        raise RecipeError(f"--student {recipe.student!r} is neither a folder nor a timm architecture")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(recipe.student, pretrained=recipe.pretrained_student, **kwargs)


def check_head(student: torch.nn.Module, data: RecipeData, label_column: str | None) -> None:
    head = common.head_size(student)
    if head is not None and head < data.num_classes:
        raise RecipeError(
            f"the label column {label_column or ''!r} has {data.num_classes} classes but the student's head has "
            f"{head} outputs; use a student built for {data.num_classes} classes (a timm architecture name is built "
            "with the dataset's class count)"
        )


def log(args, message: str) -> None:
    common.log(args, message, TAG)


def main(argv: list[str] | None = None, callbacks=()) -> list[str]:
    """Run the recipe; `callbacks` join the training callbacks of the final stage (for tests and custom logging)."""
    recipe, args, hub = parse_args(argv)
    raw = load_raw(recipe, args)
    num_classes = raw[4]
    if recipe.method == "search":
        # The searched student is cut from the teacher, so the inputs follow the teacher's data config.
        student = None
        inputs_of = load_teacher(recipe.teacher) if not common.is_architecture(recipe.teacher) else None
        inputs_of = inputs_of or timm.create_model(recipe.teacher, num_classes=num_classes)
    else:
        student = inputs_of = build_student(recipe, num_classes)
    data, args = load_data(recipe, args, inputs_of, raw)
    launch = f"{args.world_size} process(es), {args.distributed_state.distributed_type.name}, {args.device}"
    count = "a stream of" if recipe.streaming else f"{len(data.train)}"
    log(args, f"{count} training and {len(data.eval)} evaluation images, {data.num_classes} classes; {launch}")
    if student is not None:
        check_head(student, data, raw[3])
        common.describe_inputs(student, data)
    if recipe.method == "ensemble":
        teacher_info = {}
        results = common.run_ensemble(recipe, args, data, callbacks=callbacks)
    else:
        teacher, teacher_info, args = common.get_teacher(recipe, args, data, student or inputs_of, TAG)
        if recipe.method == "search":
            results = common.run_search(recipe, args, data, teacher, callbacks=callbacks, tag=TAG)
        else:
            run = common.run_kd if recipe.method == "kd" else common.run_unix
            results = run(recipe, args, data, teacher, student, callbacks=callbacks)
    if args.process_index != 0:
        return []
    return common.publish(recipe, args, data, hub, results, teacher_info, TAG)


def cli() -> int:
    hint = (
        "Without the Hub, give a local copy with --dataset_path: parquet files, a folder written by "
        "`datasets.load_dataset(...).save_to_disk(DIR)`, or an image folder (train/<class>/*.png, "
        "validation/<class>/*.png)."
    )
    return common.run_cli(main, hint)


if __name__ == "__main__":
    sys.exit(cli())
