"""Write tests/torch_reference_values.py: PyTorch's numbers for the conventions that
tests/test_torch_conventions.py pins (label smoothing, cross-entropy near p = 0, warmup,
reduce on plateau, weight decay, top-k, BatchNorm's refusal), with their inputs.

Run by hand in a scratch environment with PyTorch (it is no dependency of dptrain):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python scripts/torch_reference.py > tests/torch_reference_values.py

Everything is float64 except the near-zero cross-entropy case, which is about float32.
"""

from __future__ import annotations

import math
import pprint
import re
import warnings

import torch
from torch.nn import functional
from torch.optim import lr_scheduler as sched

torch.set_default_dtype(torch.float64)

LOGITS = [[0.125, -1.5, 2.25, 0.0, -0.75], [1.0, 1.0, -2.0, 0.5, 3.0],
          [-0.25, 0.75, 0.0, -1.25, 0.5], [2.5, -0.5, 1.5, 1.0, -3.0]]
LABELS = [2, 4, 0, 3]
SOFT = [[0.7, 0.1, 0.1, 0.05, 0.05], [0.0, 0.0, 0.5, 0.5, 0.0],
        [0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 1.0, 0.0, 0.0, 0.0]]
SMOOTHING = (0.1, 0.3)
#: float32 logits whose true class has p = e^-18 and e^-25 (below float32 epsilon)
FAR_LOGITS = [[0.0, 8.0, 18.0, -3.0], [5.0, 0.0, -20.0, 1.0], [4.0, -1.0, 0.0, 0.5]]
FAR_LABELS = [0, 2, 0]

PLATEAU_LOSS = [1.0, 0.9, 0.85, 0.85, 0.849, 0.86, 0.84, 0.8399, 0.84, 0.83, 0.83, 0.83,
                0.831, 0.7, 0.7, float("nan"), 0.7, 0.7, 0.71, 0.69, 0.69, 0.69, 0.69,
                0.69, 0.69, 0.5, 0.5, 0.5, 0.5, 0.5]
PLATEAU_ACC = [0.5, 0.6, 0.62, 0.62, 0.621, 0.63, 0.63, 0.63, 0.64, 0.64, 0.64, 0.9, 0.9,
               0.9, 0.9, 0.9, 0.901, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95]
#: (name, metric sequence, ReduceLROnPlateau keyword arguments), base lr 1.0
PLATEAU_CASES = [
    ("loss_rel", "PLATEAU_LOSS", dict(mode="min", factor=0.5, patience=2, threshold=0.01,
                                      threshold_mode="rel", cooldown=1, min_lr=0.02)),
    ("loss_abs", "PLATEAU_LOSS", dict(mode="min", factor=0.3, patience=0, threshold=0.005,
                                      threshold_mode="abs", cooldown=2, min_lr=0.0)),
    ("acc_rel", "PLATEAU_ACC", dict(mode="max", factor=0.1, patience=1, threshold=1e-4,
                                    threshold_mode="rel", cooldown=0, min_lr=1e-3)),
    ("acc_abs", "PLATEAU_ACC", dict(mode="max", factor=0.5, patience=3, threshold=0.01,
                                    threshold_mode="abs", cooldown=1, min_lr=0.1)),
]

PARAMS = [0.5, -1.25, 2.0, 0.0, -0.375, 1.5]
GRADS = [[0.1, -0.2, 0.3, 0.05, -0.4, 0.25], [-0.3, 0.1, 0.2, -0.15, 0.05, -0.1],
         [0.2, 0.2, -0.1, 0.3, -0.2, 0.0]]
#: (name, torch optimizer, keyword arguments)
OPTIMIZERS = [
    ("sgd_nesterov_wd", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd_momentum_wd", "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("sgd_plain_wd", "SGD", dict(lr=0.1, momentum=0.0, weight_decay=0.05)),
    ("adam_wd", "Adam", dict(lr=0.01, weight_decay=0.1)),
    ("adamw_wd", "AdamW", dict(lr=0.01, weight_decay=0.1)),
]


def smoothed_cross_entropy() -> dict:
    out = {}
    for eps in SMOOTHING:
        for kind, target in (("labels", torch.tensor(LABELS)), ("soft", torch.tensor(SOFT))):
            z = torch.tensor(LOGITS, requires_grad=True)
            loss = functional.cross_entropy(z, target, label_smoothing=eps)
            loss.backward()
            out[(eps, kind)] = (loss.item(), z.grad.tolist())
    return out


def far_from_target() -> tuple[float, list, list]:
    """NLLLoss(log(softmax)) in float32, with the gradient of the logits and of p."""
    z = torch.tensor(FAR_LOGITS, dtype=torch.float32, requires_grad=True)
    p = torch.softmax(z, dim=1)
    p.retain_grad()
    loss = functional.nll_loss(torch.log(p), torch.tensor(FAR_LABELS))
    loss.backward()
    return loss.item(), z.grad.tolist(), p.grad.tolist()


def warmup_lrs(main: str, base: float, warmup: int, steps: int, **kw: float) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    linear = sched.LinearLR(opt, start_factor=1 / (warmup + 1), end_factor=1.0,
                            total_iters=warmup)
    after = {"cosine": lambda: sched.CosineAnnealingLR(opt, **kw),
             "step": lambda: sched.StepLR(opt, **kw),
             "constant": lambda: sched.LambdaLR(opt, lambda e: 1.0)}[main]()
    s = sched.SequentialLR(opt, [linear, after], milestones=[warmup])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


def plateau_lrs(metrics: list[float], kw: dict) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = sched.ReduceLROnPlateau(opt, **kw)
    lrs = []
    for m in metrics:
        s.step(m)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def optimizer_params(name: str, kw: dict) -> list[float]:
    p = torch.nn.Parameter(torch.tensor(PARAMS))
    opt = getattr(torch.optim, name)([p], **kw)
    for g in GRADS:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().tolist()


def topk_counts() -> dict:
    """Top-1/top-5 hits of 40 random rows of 10 classes (no ties) by torch.topk."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, 10, generator=gen).round(decimals=3)
    y = torch.randint(0, 10, (40,), generator=gen)
    hits = {k: int((z.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum()) for k in (1, 5)}
    return {"logits": z.tolist(), "labels": y.tolist(), "hits": hits}


def batchnorm_refusals() -> dict[str, bool]:
    """Which training inputs (N, C, H, W) BatchNorm2d refuses."""
    bn = torch.nn.BatchNorm2d(3)
    out = {}
    for shape in ((1, 3, 1, 1), (1, 3, 2, 1), (2, 3, 1, 1)):
        try:
            bn(torch.ones(shape))
            out[str(shape)] = False
        except ValueError:
            out[str(shape)] = True
    return out


def _literal(name: str, value: object) -> str:
    text = pprint.pformat(value, width=96 - len(name), compact=True)
    text = re.sub(r"\bnan\b", "math.nan", text)
    indent = " " * (len(name) + 3)
    return f"{name} = " + text.replace("\n", "\n" + indent)


def main() -> None:
    warnings.simplefilter("ignore")
    seqs = {"PLATEAU_LOSS": PLATEAU_LOSS, "PLATEAU_ACC": PLATEAU_ACC}
    values = {
        "LOGITS": LOGITS, "LABELS": LABELS, "SOFT": SOFT, "SMOOTHING": SMOOTHING,
        "SMOOTHED_CE": smoothed_cross_entropy(),
        "FAR_LOGITS": FAR_LOGITS, "FAR_LABELS": FAR_LABELS, "FAR_CE": far_from_target(),
        "WARMUP_COSINE": warmup_lrs("cosine", 1.0, 10, 111, T_max=100, eta_min=0.1),
        "WARMUP_STEP": warmup_lrs("step", 0.3, 4, 16, step_size=3, gamma=0.5),
        "WARMUP_CONSTANT": warmup_lrs("constant", 0.05, 3, 7),
        "PLATEAU_LOSS": PLATEAU_LOSS, "PLATEAU_ACC": PLATEAU_ACC,
        "PLATEAU_CASES": PLATEAU_CASES,
        "PLATEAU_LRS": {n: plateau_lrs(seqs[seq], kw) for n, seq, kw in PLATEAU_CASES},
        "PARAMS": PARAMS, "GRADS": GRADS, "OPTIMIZERS": OPTIMIZERS,
        "OPTIMIZER_PARAMS": {n: optimizer_params(t, kw) for n, t, kw in OPTIMIZERS},
        "TOPK": topk_counts(), "BATCHNORM_REFUSES": batchnorm_refusals(),
    }
    print(f'"""PyTorch {torch.__version__} (CPU) reference values, written by '
          'scripts/torch_reference.py\n(see there for how each was made); do not edit."""\n')
    print("import math\n\n# ruff: noqa: E501\n")
    for name, value in values.items():
        print(_literal(name, value))
    assert math.isfinite(values["FAR_CE"][0])


if __name__ == "__main__":
    main()
