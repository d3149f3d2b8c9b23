"""The batch helpers every module shares: one copy each (unwrap, batch size, sample index, resize)."""

import pytest
import timm
import torch

from hf_kdsearch.batch import SampleIndexDataset, batch_size, sample_index, unwrap
from hf_kdsearch.data import TensorImageDataset


def test_unwrap_goes_through_compile_and_data_parallel_and_on_request_the_timm_wrapper():
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    inner = timm.create_model("mnist_mlp", hidden_dims=[8], img_size=8)
    wrapped = torch.nn.DataParallel(torch.compile(inner))
    assert unwrap(wrapped) is inner
    config = TimmWrapperConfig(architecture="mnist_mlp", num_labels=10, model_args={"hidden_dims": [8], "img_size": 8})
    hf = TimmWrapperForImageClassification(config)
    assert unwrap(torch.nn.DataParallel(hf)) is hf  # keeps transformers' config
    assert unwrap(torch.nn.DataParallel(hf), timm_wrapper=True) is hf.timm_model


def test_batch_size_counts_model_inputs_before_loss_keys():
    assert batch_size({"sample_index": torch.arange(2), "pixel_values": torch.zeros(5, 1)}) == 5
    assert batch_size({"labels": torch.arange(3), "scale": torch.tensor(1.0)}) == 3
    assert batch_size({"flag": True}) == 0


def test_sample_index_dataset_and_the_helper_that_reads_it():
    data = TensorImageDataset(torch.zeros(6, 1, 2, 2), torch.arange(6))
    wrapped = SampleIndexDataset.wrap(data)
    assert SampleIndexDataset.wrap(wrapped) is wrapped and SampleIndexDataset.unwrap(wrapped) is data
    assert int(wrapped[4]["sample_index"]) == 4 and wrapped.labels is data.labels
    batch = wrapped.__getitems__([5, 1])
    batch = batch if isinstance(batch, dict) else {"sample_index": torch.stack([b["sample_index"] for b in batch])}
    assert sample_index(batch, "this test").tolist() == [5, 1]
    with pytest.raises(KeyError, match="this test needs 'sample_index' in every batch"):
        sample_index({"pixel_values": torch.zeros(1)}, "this test")
