"""Barrier formulas on hand-made curves and the effective noise scale read from training
metadata (hand-written files, values worked out by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergecli.errors import RecipeError
from mergecli.sweep.landscape import barrier, chord_barrier
from mergecli.sweep.noise import training_hyperparameters


def test_both_barriers_on_hand_curves() -> None:
    alphas = [0.0, 0.25, 0.5, 1.0]
    # a straight line from 1 to 3: the ends' mean is 2, the line's top 3; the chord is the line
    line = [1.0, 1.5, 2.0, 3.0]
    assert barrier(line, False) == pytest.approx(1.0)
    assert chord_barrier(line, alphas, False) == pytest.approx(0.0)
    # a bump: the chord at α = 0.25 is 0.75·1 + 0.25·2.6 = 1.4, at 0.5 it is 1.8; heights
    # 2.5 − 1.4 and 2.2 − 1.8; the ends' barrier is the top 2.6 minus their mean 1.8
    bump = [1.0, 2.5, 2.2, 2.6]
    assert chord_barrier(bump, alphas, False) == pytest.approx(1.1)
    assert barrier(bump, False) == pytest.approx(0.8)
    # scores (higher is better) mirror it: a dip of 0.6 below the chord 0.5·0.8 + 0.5·0.4
    scores = [0.8, 0.7, 0.0, 0.4]
    assert chord_barrier(scores, alphas, True) == pytest.approx(0.6)
    assert barrier(scores, True) == pytest.approx(0.6)
    # an α grid that is not [0, 1]: s = (α − α0)/(αn − α0)
    assert chord_barrier([0.0, 5.0, 2.0], [0.2, 0.4, 1.0], False) == pytest.approx(5.0 - 0.5)


def _run(root: Path, files: dict[str, dict], at: str = "checkpoint-20") -> Path:
    """A run folder with checkpoint-10 and checkpoint-20; ``files`` written into ``at``."""
    for step in (10, 20):
        (root / f"checkpoint-{step}").mkdir(parents=True)
    for name, content in files.items():
        (root / at / name).write_text(json.dumps(content))
    return root


def test_noise_scale_from_training_args(tmp_path: Path) -> None:
    args = {
        "learning_rate": 3e-4,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 4,
        "optim": "adamw_torch",
        "adam_beta1": 0.8,
    }
    run = _run(tmp_path / "run", {"training_args.json": args})
    found = training_hyperparameters("r", run)
    assert found["batch_size"] == 64
    assert found["momentum"] == pytest.approx(0.8)
    assert found["noise_scale"] == pytest.approx(3e-4 / (64 * 0.2))
    assert found["sources"]["learning_rate"].endswith("checkpoint-20/training_args.json")
    # checkpoint-10 has no metadata, and neither has the run folder above it
    with pytest.raises(RecipeError, match=r"r10 .*no learning_rate.*give --lr"):
        training_hyperparameters("r10", run / "checkpoint-10")
    # SGD with its own momentum key; given values replace the files'
    sgd = {**args, "optim": "sgd", "momentum": 0.9}
    run2 = _run(tmp_path / "sgd", {"training_args.json": sgd})
    given = training_hyperparameters("s", run2, {"learning_rate": 0.1, "momentum": None})
    assert given["noise_scale"] == pytest.approx(0.1 / (64 * 0.1))
    assert given["sources"]["learning_rate"] == "given"


def test_noise_scale_from_trainer_state(tmp_path: Path) -> None:
    state = {
        "train_batch_size": 32,
        "log_history": [
            {"step": 5, "learning_rate": 1e-4, "loss": 2.0},
            {"step": 10, "learning_rate": 5e-4, "loss": 1.5},
            {"step": 10, "eval_loss": 1.7},
            {"step": 20, "learning_rate": 2e-4, "loss": 1.2},
        ],
    }
    run = _run(tmp_path / "run", {"trainer_state.json": state})
    # trainer_state.json has no momentum: an error naming the run and the key
    with pytest.raises(RecipeError, match=r"^run1 \(.*\): no momentum .*give --momentum"):
        training_hyperparameters("run1", run)
    found = training_hyperparameters("run1", run, {"momentum": 0.0})
    assert found["learning_rate"] == pytest.approx(5e-4)  # the schedule's peak
    assert found["noise_scale"] == pytest.approx(5e-4 / 32)
    # a checkpoint reads its run folder's files too
    (run / "training_args.json").write_text(json.dumps({"adam_beta1": 0.95}))
    assert training_hyperparameters("c", run / "checkpoint-20")["momentum"] == pytest.approx(0.95)
    with pytest.raises(RecipeError, match="0 ≤ μ < 1"):
        training_hyperparameters("run1", run, {"momentum": 1.0})
