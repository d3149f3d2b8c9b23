"""Fine-tune an image classifier with the Hugging Face Trainer.

Written for the tests in the structure of transformers' `examples/pytorch/image-classification/
run_image_classification.py` (model and data argument dataclasses parsed with `HfArgumentParser` together with
`TrainingArguments`, torchvision transforms from the model's image processor, a `Trainer`, then train, evaluate and a
model card). It is plain Trainer code: `tests/test_dropin.py` turns it into a distillation script by changing two lines.

    python run_image_classification.py --model_name_or_path <folder> --train_dir <imagefolder> --output_dir out \
        --do_train --do_eval
"""

# The Trainer and its arguments are imported on lines of their own: the two lines a test swaps.
# isort: skip_file
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import load_dataset
from torchvision.transforms import (
    CenterCrop,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    set_seed,
)
from transformers import Trainer
from transformers import TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    train_dir: str = field(metadata={"help": "An image folder: <train_dir>/<class name>/<image>."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder for evaluation."})
    train_val_split: float = field(default=0.25, metadata={"help": "Share of train held out without validation_dir."})
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The column holding the labels."})


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(metadata={"help": "A model folder or Hub id."})
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor, if not the model's."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Allow a new classification head."})


def collate_fn(examples):
    pixel_values = torch.stack([example["pixel_values"] for example in examples])
    labels = torch.tensor([example["label"] for example in examples])
    return {"pixel_values": pixel_values, "labels": labels}


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO,
    )
    set_seed(training_args.seed)

    data_files = {"train": os.path.join(data_args.train_dir, "**")}
    if data_args.validation_dir is not None:
        data_files["validation"] = os.path.join(data_args.validation_dir, "**")
    dataset = load_dataset("imagefolder", data_files=data_files)
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]

    labels = dataset["train"].features[data_args.label_column_name].names
    label2id = {label: str(i) for i, label in enumerate(labels)}
    id2label = {str(i): label for i, label in enumerate(labels)}

    def compute_metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, axis=1) == p.label_ids).mean())}

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
    )
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path
    )

    if "shortest_edge" in image_processor.size:
        size = image_processor.size["shortest_edge"]
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    _train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])
    _val_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def train_transforms(example_batch):
        images = example_batch[data_args.image_column_name]
        example_batch["pixel_values"] = [_train_transforms(image.convert("RGB")) for image in images]
        return example_batch

    def val_transforms(example_batch):
        images = example_batch[data_args.image_column_name]
        example_batch["pixel_values"] = [_val_transforms(image.convert("RGB")) for image in images]
        return example_batch

    dataset["train"].set_transform(train_transforms)
    dataset["validation"].set_transform(val_transforms)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "image-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
