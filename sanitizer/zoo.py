"""Encoders the package defines itself, registered with timm so that `timm:NAME` builds them.

timm's resnet18 has an ImageNet stem (7x7 stride-2 conv and a max-pool) that throws away most of a
32 px image; the SSL backdoor literature (SimCLR, BadEncoder, DRUPE, CTRL) uses the CIFAR stem below.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

# Arguments timm's create_model passes to every entry point; they are not ResNet's.
_FACTORY_ONLY_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cifar_cfg() -> dict:
    return {
        "input_size": (3, 32, 32),
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "num_classes": 0,
        "classifier": "fc",
    }


def _cifar_resnet(block: type[nn.Module], layers: tuple[int, ...], **kwargs) -> ResNet:
    """A timm ResNet with the CIFAR stem: a 3x3 stride-1 conv (64 channels) and no max-pool, as
    SimCLR trainers build torchvision's ResNets for 32 px images (the same key names)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY_KWARGS}
    model = ResNet(block=block, layers=layers, **kwargs)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.pretrained_cfg = model.default_cfg = _cifar_cfg()
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem; 512-d pooled output."""
    return _cifar_resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with the CIFAR stem; 2048-d pooled output."""
    return _cifar_resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


def _imagenet_cfg(classifier: str) -> dict:
    return {
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "num_classes": 0,
        "classifier": classifier,
    }


@register_model
def mobilenetv2_tv(pretrained: bool = False, num_classes: int = 0, **kwargs) -> nn.Module:
    """torchvision's MobileNetV2 (its own key names), so torchvision checkpoints load as `timm:` specs.

    With num_classes=0 the classifier is dropped and the 1280-d pooled feature is the embedding.
    """
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=max(num_classes, 1))
    if not num_classes:
        model.classifier = nn.Identity()
    model.pretrained_cfg = model.default_cfg = _imagenet_cfg("classifier")
    return model


@register_model
def resnet10_cifar_s(pretrained: bool = False, **kwargs) -> ResNet:
    """A small CIFAR-stem ResNet (64-wide stem, one block per stage, 32-256 channels, 256-d).

    About 8x cheaper than resnet18_cifar: small enough to train a SimCLR victim on two CPU cores.
    """
    return _cifar_resnet(BasicBlock, (1, 1, 1, 1), channels=(32, 64, 128, 256), **kwargs)
