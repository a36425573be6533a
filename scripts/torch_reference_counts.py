"""Parameter and multiply-add counts of the model zoo's architectures, built in PyTorch.

The reference for the literals in tests/test_presets.py: the same four models written
with torch.nn (ResNet-20/56 as in He et al. 2016, section 4.2, with projection shortcuts;
ResNet-18 with a 3x3 stride-1 stem; VGG-11 with batch norm for 32x32 inputs), counted by
PyTorch itself: ``sum(p.numel())`` for parameters, and forward hooks on every Conv2d and
Linear for the multiply-adds of one 32x32x3 sample. Needs PyTorch, which dptrain does not
depend on (the figures in the test come from PyTorch 2.13.0+cpu)::

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0
    /tmp/torchvenv/bin/python scripts/torch_reference_counts.py
"""

from __future__ import annotations

import json
import sys

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover
    sys.exit("this script needs PyTorch (see its docstring)")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; identity or strided 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.main(x) + self.shortcut(x))


def resnet(widths: list[int], blocks: int, classes: int) -> nn.Module:
    """3x3 stride-1 stem of widths[0] filters, one stage of ``blocks`` basic blocks per
    width (stride 2 from the second stage on), global average pooling, linear."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def vgg11_bn(classes: int) -> nn.Module:
    """VGG-11 ("A") with batch norm after every convolution, for 32x32 inputs."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, 1, 1), nn.BatchNorm2d(v), nn.ReLU()]
            cin = v
    layers += [nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def multiply_adds(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-adds of Conv2d and Linear layers in one forward pass of one sample."""
    total = [0]

    def conv(m: nn.Conv2d, _: object, y: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += y[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _: object, y: torch.Tensor) -> None:
        total[0] += y[0].numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear)
    model.train(False)  # evaluation mode
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    return total[0]


def main() -> None:
    models = {"resnet20": lambda: resnet([16, 32, 64], 3, 10),
              "resnet56": lambda: resnet([16, 32, 64], 9, 10),
              "resnet18": lambda: resnet([64, 128, 256, 512], 2, 10),
              "vgg11": lambda: vgg11_bn(10)}
    for name, make in models.items():
        model = make()
        print(json.dumps({"model": name, "torch": torch.__version__, "classes": 10,
                          "params": sum(p.numel() for p in model.parameters()),
                          "multiply_adds_32x32x3": multiply_adds(model, (3, 32, 32))}))


if __name__ == "__main__":
    main()
