"""Config: TOML files, overrides, validation messages, --help coverage."""

from __future__ import annotations

from pathlib import Path

import pytest

from dptrain.cli import train_parser
from dptrain.config import FIELDS, load_toml, make_config, parse_checkpoint_every
from dptrain.errors import UserError


def test_toml_sections_flatten_and_types_check(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('epochs = 3\n[optim]\nlr = 1\noptimizer = "sgd"\n'
                 'layers = [{type = "flatten"}, {type = "dense", units = 10}]\n')
    cfg = make_config(load_toml(f))
    assert cfg.schedule.epochs == 3 and cfg.optim.lr == 1.0 and cfg.optim.optimizer == "sgd"
    assert cfg.model.layers[1] == {"type": "dense", "units": 10}


@pytest.mark.parametrize("values,message", [
    ({"epocs": 3}, "unknown config key 'epocs'"),
    ({"epochs": "3"}, "'epochs' must be int"),
    ({"lr": True}, "'lr' must be float"),
    ({"optimizer": "lbfgs"}, "must be one of sgd, adam, adamw"),
    ({"batch_size": 0}, "batch_size must be a positive"),
    ({"batch_size": -4}, "batch_size must be a positive"),
    ({"batch_size": 8, "batch_per_rank": 2}, "not both"),
    ({"epochs": 0}, "epochs must be positive"),
    ({"checkpoint_every": "soon"}, "checkpoint_every"),
    ({"layers": [1, 2]}, "layers must be a list of tables"),
])
def test_bad_values_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as e:
        make_config(values)
    assert "\n" not in str(e.value)


def test_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("epochs = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(f)
    with pytest.raises(UserError, match="not found"):
        load_toml(tmp_path / "missing.toml")


def test_checkpoint_every_forms() -> None:
    assert parse_checkpoint_every("epoch") == ("epoch", 0)
    assert parse_checkpoint_every("25") == ("steps", 25)
    assert parse_checkpoint_every("10m") == ("seconds", 600.0)
    assert parse_checkpoint_every("1.5h") == ("seconds", 5400.0)


def test_help_documents_every_option() -> None:
    text = train_parser().format_help()
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name


def test_global_batch() -> None:
    assert make_config({}).schedule.global_batch(4) == 64
    assert make_config({"batch_size": 50}).schedule.global_batch(3) == 50
    assert make_config({"batch_per_rank": 16}).schedule.global_batch(3) == 48


def test_configuration_reference_is_current() -> None:
    from conftest import ROOT, run_python

    proc = run_python([str(ROOT / "scripts" / "config_reference.py"), "--check"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in FIELDS:
        assert f"| `{name}` |" in text, name
