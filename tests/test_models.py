"""Model shapes and parameter counts against the MNIST-1D paper; the ResNet stem; errors by name."""

import pytest
import torch
from torch import nn

from ray_codistill.config import ModelConfig
from ray_codistill.models import ModelError, build_model, check_model, count_parameters


def test_mnist1d_cnn_matches_paper():
    model = build_model(ModelConfig(name="mnist1d_cnn"), (40,), 10)
    assert model(torch.randn(7, 40)).shape == (7, 10)
    conv1 = 25 * 1 * 5 + 25
    conv2 = conv3 = 25 * 25 * 3 + 25
    linear = 125 * 10 + 10
    assert count_parameters(model) == conv1 + conv2 + conv3 + linear == 5210


def test_mnist1d_cnn_follows_length_and_channels():
    model = build_model(ModelConfig(name="mnist1d_cnn", channels=8), (64,), 4)
    assert model(torch.randn(3, 64)).shape == (3, 4)
    assert model.linear.in_features == 8 * 8  # 64 -> 31 -> 16 -> 8


def test_mlp():
    model = build_model(ModelConfig(name="mlp", hidden=32), (3, 4, 4), 5)
    assert model(torch.randn(6, 3, 4, 4)).shape == (6, 5)
    assert count_parameters(model) == (48 * 32 + 32) + (32 * 32 + 32) + (32 * 5 + 5)


def test_resnet18_small_input_stem():
    cfg = ModelConfig(name="resnet18", small_input_stem=True)
    model = check_model(cfg, (3, 32, 32), 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.out_channels == 64
    assert isinstance(model.maxpool, nn.Identity)


def test_unknown_model_names_the_key():
    with pytest.raises(ModelError, match=r"model\.name.*'resnet_nope'.*mnist1d_cnn.*resnet18"):
        build_model(ModelConfig(name="resnet_nope"), (3, 32, 32), 10)


def test_check_model_refuses_mismatched_inputs():
    with pytest.raises(ModelError, match=r"model\.name=mnist1d_cnn needs 1-D inputs"):
        check_model(ModelConfig(name="mnist1d_cnn"), (3, 32, 32), 10)
    with pytest.raises(ModelError, match=r"model\.name=resnet18: forward pass fails on inputs of shape \(40,\)"):
        check_model(ModelConfig(name="resnet18"), (40,), 10)
    with pytest.raises(ModelError, match=r"model\.small_input_stem"):
        build_model(ModelConfig(name="mobilenet_v3_small", small_input_stem=True), (3, 32, 32), 10)
