"""Reference models (tucker_manifold.models): shapes, parameter counts, plain nn layers."""
import pytest
import torch
import torch.nn as nn

from tucker_manifold.models import (
    MODEL_NAMES,
    AlexNetCifar,
    LeNet5,
    ResNet18Cifar,
    VGG16Cifar,
    VGGMnist,
    build_model,
)

CASES = [  # (name, in_channels, image_size)
    ("lenet5", 1, 28),
    ("lenet5", 1, 32),
    ("lenet5", 3, 32),
    ("vgg-mnist", 1, 28),
    ("vgg-mnist", 1, 32),
    ("alexnet", 3, 32),
    ("vgg16", 3, 32),
    ("resnet18", 3, 32),
]


def _n_params(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False))


@pytest.mark.parametrize("name,c,s", CASES)
def test_forward_shapes(name, c, s):
    torch.manual_seed(0)
    m = build_model(name, in_channels=c, num_classes=10, image_size=s).eval()
    with torch.no_grad():
        out = m(torch.randn(2, c, s, s))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["lenet5", "vgg-mnist"])
def test_mnist_models_train_step(name):
    # Train mode (BatchNorm batch statistics) + backward: every parameter gets a gradient.
    torch.manual_seed(0)
    m = build_model(name, 1, 10, 28)
    loss = nn.functional.cross_entropy(m(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_lenet5_parameter_counts():
    m = LeNet5()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert _n_params(convs) == 20 * 1 * 25 + 20 + 50 * 20 * 25 + 50
    assert _n_params(linears) == 800 * 500 + 500 + 500 * 10 + 10  # 50 x 4 x 4 features at 28x28
    assert [tuple(c.weight.shape) for c in convs] == [(20, 1, 5, 5), (50, 20, 5, 5)]
    # At 32x32 the feature map is 5x5.
    assert LeNet5(image_size=32).classifier[1].in_features == 50 * 5 * 5
    with pytest.raises(ValueError, match="image_size"):
        LeNet5(image_size=12)


def test_vgg_mnist_structure():
    m = VGGMnist()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 6
    assert m.classifier.in_features == 128
    assert [c.out_channels for c in VGGMnist(widths=(8, 16)).modules() if isinstance(c, nn.Conv2d)] == [8, 8, 16, 16]


def test_cifar_model_sizes():
    # Reference counts: ResNet18 = kuangliu/pytorch-cifar's 11,173,962; VGG16-BN likewise but
    # without the conv biases (redundant before BatchNorm): 14,728,266 - 4,224.
    assert sum(p.numel() for p in ResNet18Cifar().parameters()) == 11_173_962
    assert sum(p.numel() for p in VGG16Cifar().parameters()) == 14_728_266 - 4_224
    count = lambda m, t: sum(isinstance(x, t) for x in m.modules())  # noqa: E731
    assert count(VGG16Cifar(), nn.Conv2d) == 13 and count(VGG16Cifar(), nn.Linear) == 1
    assert count(ResNet18Cifar(), nn.Conv2d) == 20  # stem + 16 block convs + 3 projections
    assert count(AlexNetCifar(), nn.Conv2d) == 5 and count(AlexNetCifar(), nn.Linear) == 3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_only_standard_layers(name):
    # Weighted layers must be exactly nn.Conv2d / nn.Linear / nn.BatchNorm2d so that the Tucker
    # layer replacement can find them by type.
    m = build_model(name, 3 if name in ("alexnet", "vgg16", "resnet18") else 1, 10, 32)
    for mod in m.modules():
        if list(mod.parameters(recurse=False)):
            assert type(mod) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d), type(mod)


def test_build_model_names():
    assert isinstance(build_model("LeNet5", 1, 10, 28), LeNet5)
    assert isinstance(build_model("vgg_mnist", 1, 10, 28), VGGMnist)
    assert build_model("resnet18", 3, 100, 32).linear.out_features == 100
    with pytest.raises(ValueError, match="name") as exc:
        build_model("resnet50", 3, 10, 32)
    for n in MODEL_NAMES:
        assert n in str(exc.value)
