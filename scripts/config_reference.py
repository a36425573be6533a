"""Write docs/configuration.md from the options' own declarations (dptrain/config.py).

    python scripts/config_reference.py             # rewrites docs/configuration.md
    python scripts/config_reference.py --check     # exit 1 if the file is out of date

Every option is declared once, with its section, default, choices and range; the
command line, ``--help`` and this reference all come from that declaration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import dptrain  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dptrain.config import FIELDS, SECTIONS

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEAD = """# Configuration reference

Every option is a key of the TOML config file and a command-line flag (the key with
dashes: `batch_size` is `--batch-size`; booleans also have `--no-...`). The command line
wins over the file. A key may sit at the top level of the file or in any table; the
tables below are the canonical sections, which is how `--help` groups them:

```toml
# example.toml
[model]
model = "resnet20"
[data]
dataset = "synthetic"
synthetic_shape = [32, 32, 3]
[schedule]
epochs = 2
batch_size = 128
lr_schedule = "cosine"
[optim]
optimizer = "sgd"
lr = 0.1
momentum = 0.9
```

```bash long
python -m dptrain --config example.toml --lr 0.05
```

A value outside its range (NaN and Inf are refused wherever a number is meant) is one
line, `dptrain: error: lr must be a finite number (> 0), not nan`, and exit code 2; an
unknown key names the closest known one. `config.json` in a run directory records every
option by name.

This file is written by `python scripts/config_reference.py` from the declarations in
`dptrain/config.py`; a test keeps it current.
"""


def reference() -> str:
    parts = [HEAD]
    for section, cls in SECTIONS.items():
        parts.append(f"\n## [{section}]\n\n{(cls.__doc__ or '').strip()}\n")
        parts.append("| option | default | allowed | what it does |\n|---|---|---|---|")
        for name, o in FIELDS.items():
            if o.section != section:
                continue
            allowed = (", ".join(f"`{c}`" for c in o.choices) if o.choices else
                       o.range.text() if o.range is not None else
                       {bool: "true / false", tuple: "a list", str: "text"}.get(o.kind, ""))
            text = " ".join(o.help.split()).replace("|", "\\|")
            parts.append(f"| `{name}` | {o.shown_default()} | {allowed} | {text} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the file is current")
    args = p.parse_args(argv)
    text = reference()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
