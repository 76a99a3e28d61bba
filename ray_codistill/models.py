"""Model builders: the MNIST-1D paper's CNN, a small MLP, torchvision classifiers by name, and a
GPT for text (`gpt.py`).

`check_model` builds a model and runs one forward pass, so the launcher can refuse a model that
does not fit the data (ModelError) before any Ray worker starts. Weights are never downloaded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ModelError

OWN_MODELS = ("mnist1d_cnn", "mlp", "gpt")


def _conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DCNN(nn.Module):
    """ConvBase of the mnist1d repository (Greydanus 2020); layer names kept as there."""

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = _conv_out(_conv_out(_conv_out(length, 5, 2, 1), 3, 2, 1), 3, 2, 1)
        if out < 1:
            raise ModelError(f"model.name=mnist1d_cnn: input length {length} is too short (needs >= 3)")
        self.linear = nn.Linear(channels * out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], 1, -1)
        h = self.conv1(h).relu()
        h = self.conv2(h).relu()
        h = self.conv3(h).relu()
        return self.linear(h.flatten(1))


def _mlp(in_features: int, hidden: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _torchvision_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import torchvision  # slow to import; only models by name need it

    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.name not in names:
        raise ModelError(f"model.name: unknown model {cfg.name!r}; allowed: {', '.join(OWN_MODELS)}, "
                         f"or a torchvision classifier such as {', '.join(n for n in names if n.startswith('resnet'))} "
                         f"({len(names)} in all, see torchvision.models.list_models())")
    model = torchvision.models.get_model(cfg.name, weights=None, num_classes=num_classes)
    if cfg.small_input_stem:
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
            raise ModelError(f"model.small_input_stem: only for ResNet-like models (conv1 + maxpool), "
                             f"not model.name={cfg.name}")
        # The usual CIFAR stem: a 7x7 stride-2 conv plus max-pool would shrink 32x32 inputs to 8x8.
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, stride=1, padding=1,
                                bias=False)
        model.maxpool = nn.Identity()
    return model


def build_model(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> nn.Module:
    """The model of `cfg` for samples of `input_shape` and `num_classes` outputs (for text: windows
    of input_shape[0] tokens and a vocabulary of num_classes)."""
    if cfg.name == "gpt":
        from ray_codistill.gpt import GPT
        return GPT(num_classes, input_shape[0], cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout)
    if cfg.name == "mnist1d_cnn":
        if len(input_shape) != 1:
            raise ModelError(f"model.name=mnist1d_cnn needs 1-D inputs, got input shape {tuple(input_shape)}")
        return MNIST1DCNN(input_shape[0], num_classes, cfg.channels)
    if cfg.name == "mlp":
        return _mlp(math.prod(input_shape), cfg.hidden, num_classes)
    return _torchvision_model(cfg, num_classes)


def check_model(cfg: ModelConfig, input_shape: tuple, num_classes: int, text: bool = False) -> nn.Module:
    """Build the model and push a zero batch of 2 through it on CPU; ModelError if it does not fit.
    `text`: the data are token windows, whose model (gpt) answers per token."""
    if text != (cfg.name == "gpt"):
        raise ModelError(f"model.name={cfg.name}: " + ("text needs model.name=gpt" if text else
                                                        "gpt is a language model: it needs data.name=text"))
    model = build_model(cfg, input_shape, num_classes)
    model.eval()  # keeps BatchNorm statistics untouched
    expected = (2, *input_shape, num_classes) if text else (2, num_classes)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, dtype=torch.long if text else torch.float32))
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model.name={cfg.name}: forward pass fails on inputs of shape {tuple(input_shape)}: "
                         f"{first}") from err
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"model.name={cfg.name}: output is {shape} for a batch of 2, expected {expected}")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(cfg: ModelConfig) -> str:
    """A model's name and the sizes that set it, e.g. `mnist1d_cnn(channels=25)`, `gpt(4x128, 4 heads)`."""
    if cfg.name == "mnist1d_cnn":
        return f"mnist1d_cnn(channels={cfg.channels})"
    if cfg.name == "mlp":
        return f"mlp(hidden={cfg.hidden})"
    if cfg.name == "gpt":
        return f"gpt({cfg.n_layer}x{cfg.n_embd}, {cfg.n_head} heads)"
    return cfg.name
