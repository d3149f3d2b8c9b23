"""Distil on any image-classification dataset from the Hub or a local copy: KD, UNIX, student search, online ensembles.

    python recipes/image_classification.py --method kd --teacher runs/teacher --student resnet18 \\
        --dataset_path data/my_photos --image_size 160 --num_train_epochs 30 --output_dir runs/kd_photos

    accelerate launch --multi_gpu --num_processes 8 recipes/image_classification.py --method kd \\
        --teacher timm/resnet50.a1_in1k --student resnet18 --dataset_name ILSVRC/imagenet-1k --streaming \\
        --max_steps 100000 --per_device_train_batch_size 128 --output_dir runs/kd_in1k

Any dataset with an image column and an integer label column works: images of any size, RGB or greyscale (converted
to what the student takes), `ClassLabel` or plain integer labels, a `train` split plus a `validation` or `test` one
(or `--validation_split_percentage`). The four methods and their flags are those of `recipes/cifar100.py`: both are
presets over one recipe (`recipes/recipe_common.py`); this one has general defaults for a dataset of unknown size.

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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recipe_common as common  # noqa: E402

#: General defaults for a dataset of unknown size (our choice): the papers' optimiser and loss settings, 30 epochs
#: with a cosine schedule. Set your own length with --num_train_epochs or --max_steps.
COMMON_DEFAULTS = dict(
    common.TRAINING_DEFAULTS,
    student="resnet18",
    per_device_eval_batch_size=128,
    num_train_epochs=30,
    lr_scheduler_type="cosine",
    logging_steps=50,
    dataloader_num_workers=min(4, os.cpu_count() or 1),
)
#: The ensemble needs a CIFAR-style architecture (build_ensemble's width multipliers).
METHOD_DEFAULTS = {**common.KD_DEFAULTS, "ensemble": dict(common.ENSEMBLE_DEFAULTS, student="cifar_resnet20")}
DATASET_HINT = common.local_copy_hint("parquet files", "validation")
PRESET = common.Preset("image_classification", __file__, "image", COMMON_DEFAULTS, METHOD_DEFAULTS, DATASET_HINT)
parse_args, main = PRESET.parse_args, PRESET.main

if __name__ == "__main__":
    sys.exit(PRESET.cli())
