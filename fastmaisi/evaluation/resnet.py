"""ResNet-50 feature extractor for the 2.5D FID, in two state-dict layouts, loaded from a local file only.

Layouts (both Bottleneck [3, 4, 6, 3]; `state_dict()` keys are exactly those of the named source):

    torchvision   torchvision.models.resnet50 (v1.5): convs without bias, stride on the 3x3 conv, BatchNorm eps 1e-5,
                  an `fc` head (present only so the file loads strictly; features never use it). 320 entries.
    radimagenet   RadImageNet-ResNet50_notop.pth as loaded by the reference (`Warvito/radimagenet-models` via
                  torch.hub): Keras-converted, convs with bias, stride on the first 1x1 conv, BatchNorm eps 1.001e-5,
                  no head. 371 entries.

`forward` returns the global-average-pooled last feature map, (B, 2048) for the standard width: the reference's
`spatial_average(feature_network(x))`. `resnet50_from_file` picks the layout and width from the file's keys.
"""

from __future__ import annotations

import os

import torch
from torch import nn

LAYOUTS = {  # conv bias, stride on the first 1x1 conv (else on the 3x3), BatchNorm eps
    "torchvision": dict(bias=False, stride_first=False, eps=1e-5),
    "radimagenet": dict(bias=True, stride_first=True, eps=1.001e-5),
}
BLOCKS = (3, 4, 6, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, layout: dict) -> None:
        super().__init__()
        s1, s2 = (stride, 1) if layout["stride_first"] else (1, stride)
        out, bias, eps = planes * EXPANSION, layout["bias"], layout["eps"]
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=s1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=s2, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(out, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=bias),
                                            nn.BatchNorm2d(out, eps=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 (He et al. 2016) whose `state_dict` keys match `layout`; `forward(x)` -> pooled features (B, 32*width).

    Args:
        width: channels of the stem (64 for the real network; smaller only for fast tests).
        num_classes: size of the `fc` head (torchvision layout only; 0 = no head).
    """

    def __init__(self, layout: str = "torchvision", width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown ResNet-50 layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        spec = LAYOUTS[layout]
        self.layout = layout
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=spec["bias"])
        self.bn1 = nn.BatchNorm2d(width, eps=spec["eps"])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for i, blocks in enumerate(BLOCKS):
            planes = width * 2**i
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(inplanes, planes, 2 if (b == 0 and i > 0) else 1, spec))
                inplanes = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_features = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if (layout == "torchvision" and num_classes) else None
        for m in self.modules():  # torchvision's initialisation (only matters for random-weight tests)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features): the spatial mean of layer4's output (no `fc`)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def layout_of(state_dict: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(layout, width, num_classes) of a ResNet-50 state dict, from its keys; ValueError if it is not one."""
    if "conv1.weight" not in state_dict or "layer4.2.conv3.weight" not in state_dict:
        shown = ", ".join(list(state_dict)[:5])
        raise ValueError(f"not a ResNet-50 state dict (no conv1.weight / layer4.2.conv3.weight; keys start {shown})")
    layout = "radimagenet" if "conv1.bias" in state_dict else "torchvision"
    width = int(state_dict["conv1.weight"].shape[0])
    num_classes = int(state_dict["fc.weight"].shape[0]) if "fc.weight" in state_dict else 0
    return layout, width, num_classes


def resnet50_from_file(path: str | os.PathLike) -> ResNet50:
    """Build the ResNet-50 a local weight file describes and load it strictly; eval mode, CPU.

    Accepts `.pt`/`.pth` (read with `torch.load(weights_only=True)`, plain or wrapped state dicts) and `.safetensors`
    (see `fastmaisi.weights`). Missing `num_batches_tracked` buffers (unused in eval mode; some converters drop them)
    are filled with 0; any other difference is a `CheckpointError` listing the keys.
    """
    from fastmaisi.weights import load_into, load_state_dict_file

    state_dict, _ = load_state_dict_file(path)
    layout, width, num_classes = layout_of(state_dict)
    net = ResNet50(layout, width=width, num_classes=num_classes)
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)
    load_into(net, state_dict, name=os.fspath(path))
    return net.eval()
