"""Evaluators against direct computations: accuracy and loss by hand, causal-LM cross-entropy
by hand, commands, in-memory against folder evaluation, recipe errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

import mergecli
from mergecli.errors import EvaluationError, RecipeError
from mergecli.evaluate import Scorer
from mergecli.recipe import recipe_from_dict
from tests.eval_zoo import TASKS, build_zoo, direct_scores, load_classifier
from tests.helpers import load_state, run_cli, write_recipe

DATA_TEMPLATE = "data/{task}/validation.jsonl"


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("clf"))


def recipe(root: Path, evaluate: dict, **extra: object) -> mergecli.Recipe:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"runs/{t}/checkpoint-20", "name": t} for t in TASKS],
        "parameters": {"lambda": 0.5},
        "evaluate": evaluate,
        **extra,
    }
    return recipe_from_dict(data, root)


def test_accuracy_and_loss_match_a_direct_computation(clf: Path) -> None:
    folder = clf / "runs" / "b" / "checkpoint-30"
    model = load_classifier(folder)
    for metric in ("accuracy", "loss"):
        spec = recipe(
            clf, {"metric": metric, "data": "data/{task}/validation.jsonl", "batch_size": 5}
        )
        scores = Scorer(spec).model(folder).tasks
        for task in TASKS:
            accuracy, loss = direct_scores(model, folder, clf / "data" / task / "validation.jsonl")
            assert scores[task] == pytest.approx(
                accuracy if metric == "accuracy" else loss, abs=1e-5
            )


def test_in_memory_merge_scores_like_its_folder(clf: Path, tmp_path: Path) -> None:
    spec = recipe(clf, {"metric": "loss", "data": "data/{task}/validation.jsonl"})
    scorer = Scorer(spec)
    in_memory = scorer.merge(spec).tasks
    merged = mergecli.run_merge(mergecli.plan_merge(spec), tmp_path / "merged").output
    assert scorer.model(merged).tasks == pytest.approx(in_memory, abs=1e-6)
    # the merge itself, densely: base + λ Σ τ, scored example by example
    base = load_state(clf / "base")
    experts = [load_state(clf / "runs" / t / "checkpoint-20") for t in TASKS]
    dense = {k: base[k] + 0.5 * sum(e[k] - base[k] for e in experts) for k in base}
    model = load_classifier(clf / "base", dense)
    for task in TASKS:
        _, loss = direct_scores(model, clf / "base", clf / "data" / task / "validation.jsonl")
        assert in_memory[task] == pytest.approx(loss, abs=1e-5)


def test_causal_lm_loss_and_perplexity_match_manual_cross_entropy(
    zoo: Path, tmp_path: Path
) -> None:
    lines = ["w1 w2 w3 w4", "w5 w6", "w7 w8 w9 w10 w11 w12 w13", "w3 w3 w3"]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(zoo / "math")
    model = LlamaForCausalLM.from_pretrained(zoo / "math", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            ids = tokenizer(line, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    spec = recipe_from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(zoo / "math")}],
            "evaluate": {"metric": "loss", "data": str(tmp_path / "text.txt"), "batch_size": 3},
        }
    )
    loss = Scorer(spec).model(zoo / "math").score
    assert loss == pytest.approx(total / count, rel=1e-5)
    spec.evaluate.metric = "perplexity"  # type: ignore[union-attr]
    assert Scorer(spec).model(zoo / "math").score == pytest.approx(
        math.exp(total / count), rel=1e-5
    )
    # in memory: a one-model linear merge is the model itself
    assert Scorer(spec).merge(spec).score == pytest.approx(math.exp(total / count), rel=1e-5)


def test_masked_lm_loss_is_deterministic_and_in_memory_equals_folder(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[MASK]", *[f"w{i}" for i in range(20)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    fast.save_pretrained(tmp_path / "mlm")
    (tmp_path / "t.txt").write_text("w1 w2 w3 w4 w5 w6\nw7 w8 w9\nw10 w11 w12 w13 w14\n")
    spec = recipe_from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": "mlm"}],
            "evaluate": {"metric": "loss", "data": "t.txt"},
        },
        tmp_path,
    )
    first = Scorer(spec).model(tmp_path / "mlm").score
    assert math.isfinite(first) and first > 0
    assert Scorer(spec).model(tmp_path / "mlm").score == first
    assert Scorer(spec).merge(spec).score == pytest.approx(first, rel=1e-6)


SCRIPT = """
import json, os, sys
model, task = sys.argv[1], sys.argv[2]
assert os.path.isfile(os.path.join(model, "config.json"))
with open(os.path.join(os.path.dirname(__file__), "seen.txt"), "w") as handle:
    handle.write(model)
if task == "fail":
    print("boom: cannot score", file=sys.stderr)
    sys.exit(3)
if task == "garbage":
    print("no number here")
    sys.exit(0)
print("log line")
print(json.dumps({"score": len(task) + (0.5 if model.endswith("checkpoint-10") else 0.0)}))
"""


def command_recipe(root: Path, tasks: list[str], command: str | None = None) -> mergecli.Recipe:
    script = root / "score.py"
    script.write_text(SCRIPT)
    return recipe(
        root,
        {"command": command or f"{sys.executable} {script} {{model}} {{task}}", "tasks": tasks},
    )


def test_command_evaluator_runs_without_a_shell_and_parses_json(clf: Path) -> None:
    scorer = Scorer(command_recipe(clf, ["x", "yyy"]))
    assert not scorer.evaluator.shell  # type: ignore[union-attr]
    scores = scorer.model(clf / "runs" / "a" / "checkpoint-10").tasks
    assert scores == {"x": 1.5, "yyy": 3.5}
    # merges are scored through a temporary checkpoint folder, removed afterwards
    assert scorer.merge(command_recipe(clf, ["x", "yyy"])).tasks == {"x": 1.0, "yyy": 3.0}
    assert "mergecli-eval-" in (clf / "seen.txt").read_text()
    assert not Path((clf / "seen.txt").read_text()).exists()


def test_command_in_shell_mode_quotes_values(clf: Path, tmp_path: Path) -> None:
    spec = command_recipe(
        clf,
        ["it's"],
        f'echo {{task}} | {sys.executable} -c "import sys; print(len(sys.stdin.read().strip()))"',
    )
    scorer = Scorer(spec)
    assert scorer.evaluator.shell  # type: ignore[union-attr]
    assert scorer.model(clf / "base").tasks == {"it's": 4.0}


@pytest.mark.parametrize(
    ("task", "message"),
    [("fail", "exit status 3: boom: cannot score"), ("garbage", "printed no number")],
)
def test_command_failures_are_one_line_errors(clf: Path, task: str, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        Scorer(command_recipe(clf, [task])).model(clf / "base")


def test_bad_evaluate_sections(clf: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        recipe(clf, {"metric": "loss", "command": "x", "data": "d"})
    assert caught.value.key == "evaluate"
    with pytest.raises(RecipeError, match=r"did you mean 'metric'") as caught:
        recipe(clf, {"metrics": "loss"})
    assert caught.value.key == "evaluate.metrics"
    with pytest.raises(RecipeError, match="does not exist") as caught:
        Scorer(recipe(clf, {"metric": "loss", "data": "data/{task}/nothing.jsonl"}))
    assert caught.value.key == "evaluate.tasks.a.data"
    with pytest.raises(RecipeError, match="no model is named 'zz'") as caught:
        Scorer(
            recipe(
                clf,
                {
                    "metric": "loss",
                    "data": "data/a/validation.jsonl",
                    "tasks": {"a": {"expert": "zz"}},
                },
            )
        )
    assert caught.value.key == "evaluate.tasks.a.expert"
    with pytest.raises(RecipeError, match="lower-is-better") as caught:
        Scorer(
            recipe(
                clf, {"metric": "loss", "data": "data/a/validation.jsonl", "higher_is_better": True}
            )
        )
    assert caught.value.key == "evaluate.higher_is_better"
    bad = clf / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1", "label": "x"}) + "\n")
    with pytest.raises(EvaluationError, match=r"bad.jsonl:1: expected an integer 'label'"):
        Scorer(recipe(clf, {"metric": "accuracy", "data": str(bad)})).model(clf / "base")


def test_accuracy_refuses_a_language_model(zoo: Path, tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w1", "label": 0}) + "\n")
    spec = recipe_from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(zoo / "math")}],
            "evaluate": {"metric": "accuracy", "data": str(tmp_path / "d.jsonl")},
        }
    )
    with pytest.raises(RecipeError, match="accuracy needs a sequence-classification") as caught:
        Scorer(spec).model(zoo / "math")
    assert caught.value.key == "evaluate.metric"


def test_evaluate_command_line(clf: Path) -> None:
    spec = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": f"runs/{t}/checkpoint-20", "name": t} for t in TASKS],
        "evaluate": {"metric": "accuracy", "data": "data/{task}/validation.jsonl"},
    }
    path = write_recipe(clf, spec, "eval.yaml")
    result = run_cli("evaluate", path, "--model", clf / "runs" / "a" / "checkpoint-10", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    model = load_classifier(clf / "runs" / "a" / "checkpoint-10")
    accuracy, _ = direct_scores(model, clf / "base", clf / "data" / "a" / "validation.jsonl")
    assert row["tasks"]["a"] == pytest.approx(accuracy)
    result = run_cli("evaluate", path)
    assert result.exit_code == 0 and "task_arithmetic" in result.stdout
    # the library function behind the command, from Python
    from mergecli.evaluate.table import evaluation_table

    data = evaluation_table(
        Scorer(recipe_from_dict(spec, clf)),
        recipe_from_dict(spec, clf),
        [clf / "runs" / "a" / "checkpoint-10"],
        clf / "scores.json",
    )
    assert data["rows"][0]["tasks"]["a"] == pytest.approx(accuracy)
    assert json.loads((clf / "scores.json").read_text()) == data
    missing = write_recipe(clf, {k: v for k, v in spec.items() if k != "evaluate"}, "none.yaml")
    result = run_cli("evaluate", missing)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no 'evaluate:' section" in result.stderr


def test_checkpoint_without_tokenizer_uses_the_recipes(clf: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clf / "runs" / "a" / "checkpoint-10" / name, bare / name)
    spec = recipe(clf, {"metric": "loss", "data": DATA_TEMPLATE})
    scorer = Scorer(spec)
    assert scorer.model(bare).tasks == scorer.model(clf / "runs" / "a" / "checkpoint-10").tasks


def test_evaluate_scores_an_artifact_folder_per_task(clf: Path, tmp_path: Path) -> None:
    spec = recipe(clf, {"metric": "loss", "data": DATA_TEMPLATE}, merge_method="emr")
    spec.parameters = {}
    artifact = mergecli.run_merge(mergecli.plan_merge(spec), tmp_path / "emr").output
    path = write_recipe(
        clf,
        {
            "merge_method": "emr",
            "base_model": "base",
            "models": [{"model": f"runs/{t}/checkpoint-20", "name": t} for t in TASKS],
            "evaluate": {"metric": "loss", "data": DATA_TEMPLATE},
        },
        "emr.yaml",
    )
    result = run_cli("evaluate", path, "--model", artifact, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["rows"][0]["tasks"]
    for task in TASKS:
        exported = tmp_path / f"export-{task}"
        assert run_cli("export", artifact, "--task", task, "-o", exported).exit_code == 0
        _, loss = direct_scores(
            load_classifier(exported), clf / "base", clf / "data" / task / "validation.jsonl"
        )
        assert scores[task] == pytest.approx(loss, abs=1e-5)
