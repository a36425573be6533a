"""PyTorch's side of a paired speed comparison: the zoo's ResNet-20 (or another model of
scripts/torch_reference_counts.py) trained on synthetic data as ``scripts/bench.py`` trains
dptrain's, printing samples/s as one JSON line.

Run by hand in a scratch environment with PyTorch (it is no dependency of dptrain), in
turns with ``scripts/bench.py`` so both see the same spells of a shared machine::

    /tmp/torchvenv/bin/python scripts/bench_torch.py --model resnet20 --threads 1
    python scripts/bench.py --model resnet20 --shape 32,32,3 --batch-per-rank 64 --threads 1

Same workload: 32x32x3 float32 inputs, 10 classes, batch 64, cross-entropy, SGD with
momentum 0.9, ``--warmup`` untimed steps, then ``--steps`` timed ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover
    sys.exit("this script needs PyTorch (see its docstring)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference_counts import resnet, vgg11_bn  # noqa: E402

MODELS = {"resnet20": lambda c: resnet([16, 32, 64], 3, c),
          "resnet56": lambda c: resnet([16, 32, 64], 9, c),
          "resnet18": lambda c: resnet([64, 128, 256, 512], 2, c),
          "vgg11": vgg11_bn}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = MODELS[a.model](10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(a.batch, 3, 32, 32)
    y = torch.randint(0, 10, (a.batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"bench": "torch", "model": a.model, "threads": a.threads,
                      "batch": a.batch, "steps": a.steps, "torch": torch.__version__,
                      "samples_per_s": round(a.batch * a.steps / sum(times), 1),
                      "samples_per_s_median_step": round(a.batch / times[len(times) // 2], 1),
                      "parameters": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
