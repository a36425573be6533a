"""Files written by dptrain 0.1.0 (before the config had sections) still load and resume.

tests/data/written_by_0.1.0 holds what that version wrote for `run.toml` with --max-steps 8:
its flat config.json, the checkpoints of steps 4 and 8 and model.h5. This version must read
the TOML file, the config and every file, resume from step 4 and end at step 8 with the
very bytes that version wrote (the step is the same arithmetic), and write checkpoints of
the same layout.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from ckpt_runs import arrays, assert_identical
from conftest import run_dptrain

from dptrain import checkpoint as ckpt
from dptrain.config import config_from_dict, load_toml, make_config

OLD = Path(__file__).parent / "data" / "written_by_0.1.0"


def test_old_config_file_and_config_json_load():
    from_toml = make_config(load_toml(OLD / "run.toml"))
    recorded = config_from_dict(json.loads((OLD / "config.json").read_text()))
    assert recorded.resolved() == from_toml.replace(max_steps=8,
                                                run_dir=recorded.run.run_dir).resolved()
    assert recorded.schedule.batch_size == 100 and recorded.optim.optimizer == "sgd"
    assert config_from_dict(recorded.resolved()) == recorded  # today's sectioned form


def test_old_checkpoints_resume_to_the_same_bytes(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD / "ckpt-000000004.h5", run / "checkpoints")
    proc = run_dptrain(["--config", str(OLD / "run.toml"), "--max-steps", "8",
                        "--run-dir", str(run), "--resume", "auto"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    assert_identical(run / "checkpoints" / "ckpt-000000008.h5", OLD / "ckpt-000000008.h5")
    assert_identical(run / "model.h5", OLD / "model.h5")
    new, old = _layout(run / "checkpoints" / "ckpt-000000008.h5"), \
        _layout(OLD / "ckpt-000000008.h5")
    # the same layout; /trainer may hold more attributes (extensions' numbers, which a
    # reader of 0.1.0 does not look at), never fewer or of other types
    assert set(old["trainer"]) <= set(new.pop("trainer")) and new == \
        {k: v for k, v in old.items() if k != "trainer"}


def test_old_model_evaluates(tmp_path):
    proc = run_dptrain(["eval", "--checkpoint", str(OLD / "model.h5")], timeout=120,
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    acc = float(proc.stdout.split("accuracy ")[1].split()[0])
    ck = ckpt.read_file(OLD / "model.h5")
    assert ck.kind == "model" and 0.3 < acc <= 1.0
    assert set(arrays(OLD / "model.h5")) == {f"params/{a}/{b}" for a, b in ck.params} | \
        {f"state/{a}/{b}" for a, b in ck.state}


def _layout(path: Path) -> dict[str, object]:
    """Every group and dataset with its shape, type, chunks, filters and attribute names
    and types (the values of 'created' and of the config's new keys aside)."""
    out: dict[str, object] = {}
    with h5py.File(io.BytesIO(Path(path).read_bytes()), "r") as f:
        def visit(name: str, obj: object) -> None:
            attrs = sorted((k, type(v).__name__) for k, v in obj.attrs.items())
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.shape, str(obj.dtype), obj.chunks, obj.fletcher32, attrs)
            else:
                out[name] = attrs
        visit("/", f)
        f.visititems(visit)
    return out


def test_written_arrays_match_bit_for_bit_with_the_old_run(tmp_path):
    run = tmp_path / "fresh"
    proc = run_dptrain(["--config", str(OLD / "run.toml"), "--max-steps", "8",
                        "--run-dir", str(run)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    new, old = arrays(run / "checkpoints" / "ckpt-000000008.h5"), \
        arrays(OLD / "ckpt-000000008.h5")
    assert new.keys() == old.keys()
    assert all(np.array_equal(new[k], old[k]) for k in new)
