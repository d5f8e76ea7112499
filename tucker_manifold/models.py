"""Reference classification networks, written with plain ``torch.nn`` modules only.

Every layer that carries weights to compress is a standard ``nn.Conv2d`` or ``nn.Linear``, so the
layer-replacement utilities of :mod:`tucker_manifold.nn` can swap them for Tucker-factorized
layers without knowing these classes.

* MNIST-sized inputs (28x28; 32x32 also works): :class:`LeNet5`, :class:`VGGMnist`.
* CIFAR-10 (32x32 RGB) networks of the TDLRT experiments: :class:`AlexNetCifar`,
  :class:`VGG16Cifar`, :class:`ResNet18Cifar`.
* :func:`build_model` picks one by name.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = [
    "MODEL_NAMES",
    "LeNet5",
    "VGGMnist",
    "AlexNetCifar",
    "VGG16Cifar",
    "ResNet18Cifar",
    "BasicBlock",
    "build_model",
]

#: Valid values of ``build_model(name=...)``.
MODEL_NAMES: tuple[str, ...] = ("lenet5", "vgg-mnist", "alexnet", "vgg16", "resnet18")


class LeNet5(nn.Module):
    """The Caffe LeNet5 used in the DLRT/TDLRT papers.

    conv(in, 20, 5) - ReLU - maxpool2 - conv(20, 50, 5) - ReLU - maxpool2 - fc(50*s*s, 500) - ReLU -
    fc(500, num_classes), with ``s = ((image_size - 4) // 2 - 4) // 2`` (4 for 28, 5 for 32).
    Input ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        s = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        if s < 1:
            raise ValueError(f"LeNet5 needs image_size >= 16, got image_size={image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * s * s, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class VGGMnist(nn.Module):
    """A small VGG for 28x28 inputs whose cost is dominated by 3x3 convolutions.

    One block per entry of ``widths``: [conv3x3 - BN - ReLU] x 2 - maxpool2 (28 -> 14 -> 7 -> 3
    for the default three blocks); then global average pooling and one Linear classifier.
    About 29 MMAC per image with ``widths=(32, 64, 128)``. ``image_size`` is accepted for a uniform
    interface; any size >= ``2 ** len(widths)`` works thanks to the global pooling.
    Input ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        image_size: int = 28,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("VGGMnist needs at least one block width")
        if image_size < 2 ** len(widths):
            raise ValueError(f"image_size={image_size} too small for {len(widths)} pooling stages")
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += _conv_bn_relu(c, w) + _conv_bn_relu(w, w) + [nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class AlexNetCifar(nn.Module):
    """AlexNet adapted to 32x32 CIFAR images (the common 5-conv / 3-fc variant).

    conv(3->64, 3, stride 2) - pool - conv(64->192) - pool - conv(192->384) - conv(384->256) -
    conv(256->256) - pool (2x2 maps at 32x32), then dropout - fc(1024, 4096) - dropout -
    fc(4096, 4096) - fc(4096, num_classes). An adaptive pool to 2x2 keeps the classifier valid for
    other input sizes. Input ``(B, in_channels, 32, 32)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d((2, 2))  # identity at 32x32 input
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# VGG16 configuration "D": channel counts, "M" = 2x2 max pool.
_VGG16_CFG: tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Cifar(nn.Module):
    """VGG16 with BatchNorm for CIFAR (13 conv3x3-BN-ReLU layers, 5 pools, one Linear(512, classes)).

    At 32x32 the last feature map is 1x1; global average pooling makes other sizes work too.
    Input ``(B, in_channels, 32, 32)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += _conv_bn_relu(c, v)
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3-BN, identity (or 1x1 conv-BN projection) shortcut, ReLU."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # shapes differ: project the input
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18Cifar(nn.Module):
    """ResNet18 for CIFAR (kuangliu/pytorch-cifar layout): 3x3 stem conv, no max pool, four stages
    of two :class:`BasicBlock` (64, 128, 256, 512 channels; stride 2 from stage 2 on), global
    average pool, Linear(512, num_classes). Input ``(B, in_channels, 32, 32)`` -> ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        c = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(c, width, stride), BasicBlock(width, width, 1)))
            c = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(4) at 32x32
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Instantiate a model by name (one of :data:`MODEL_NAMES`, case-insensitive, ``_`` = ``-``).

    ``image_size`` sizes LeNet5's first Linear layer; the other models pool adaptively, so for them
    it is only checked (VGGMnist) or unused (CIFAR models, designed for 32x32)."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key == "lenet5":
        return LeNet5(in_channels, num_classes, image_size)
    if key == "vgg-mnist":
        return VGGMnist(in_channels, num_classes, image_size=image_size)
    if key == "alexnet":
        return AlexNetCifar(in_channels, num_classes)
    if key == "vgg16":
        return VGG16Cifar(in_channels, num_classes)
    if key == "resnet18":
        return ResNet18Cifar(in_channels, num_classes)
    raise ValueError(f"unknown model name={name!r}; valid names: {list(MODEL_NAMES)}")
