"""Built-in evaluators: loss, perplexity and accuracy with transformers, batched, on a device.

A model is loaded into a skeleton built once per config (``from_config``), from a checkpoint
folder's safetensors or from merged tensors in memory, and evaluated in float32:

- causal LM: mean next-token cross-entropy over every predicted token of the file;
- masked LM: mean cross-entropy on 15% of each text's non-special tokens, masked with a
  generator seeded by the recipe's seed (at least one token per text);
- sequence classification: ``loss`` is the mean cross-entropy of the labels, ``accuracy`` the
  fraction of argmax predictions equal to the label.

perplexity = exp(loss). Texts are truncated to ``max_length`` tokens (default: the model's
``max_position_embeddings``, at most 512).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mergecli.engine.whole import read_whole
from mergecli.errors import EvaluationError, RecipeError, ShapeError, SourceError
from mergecli.evaluate.predictions import Predictions
from mergecli.evaluate.tasks import Task, read_examples
from mergecli.progress import CountBar
from mergecli.recipe import EvaluateSection
from mergecli.sources import Checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MASK_RATE = 0.15
KINDS = {
    "ForCausalLM": "causal",
    "ForMaskedLM": "masked",
    "ForSequenceClassification": "classification",
}


@dataclass
class MergedState:
    """Merged tensors held in memory, with the folder whose config and tokenizer they fit."""

    state: dict[str, torch.Tensor]
    reference: Path


ModelSource = Path | MergedState


def model_kind(folder: Path) -> tuple[str, dict[str, Any]]:
    """The kind of model a checkpoint folder holds (causal, masked, classification) and its
    config; transformers' own architectures only (no remote code)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SourceError(f"{folder}: no config.json to build the model from", path=folder)
    config = json.loads(config_file.read_text())
    if "auto_map" in config:
        raise SourceError(
            f"{config_file}: custom model code (auto_map) is not run by mergecli", path=config_file
        )
    arch = (config.get("architectures") or ["?"])[0]
    kind = next((k for suffix, k in KINDS.items() if arch.endswith(suffix)), None)
    if kind is None:
        raise SourceError(
            f"{config_file}: architecture {arch} is not a causal LM, masked LM or sequence "
            "classifier, which the built-in metrics evaluate",
            path=config_file,
        )
    return kind, config


def _fingerprint(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


class BuiltinEvaluator:
    """Scores models with a built-in metric on each task's local data file."""

    in_memory = True

    def __init__(
        self,
        section: EvaluateSection,
        device: torch.device,
        seed: int = 0,
        tokenizer_fallback: Path | None = None,
    ) -> None:
        assert section.metric is not None
        self.metric = section.metric
        self.higher_is_better = self.metric == "accuracy"
        if section.higher_is_better is not None and section.higher_is_better != (
            self.higher_is_better
        ):
            raise RecipeError(
                f"evaluate.higher_is_better: {self.metric} is "
                f"{'higher' if self.higher_is_better else 'lower'}-is-better",
                key="evaluate.higher_is_better",
            )
        self.section = section
        self.device = device
        self.seed = seed
        self.tokenizer_fallback = tokenizer_fallback
        """Where the tokenizer comes from when a checkpoint folder has none (the recipe's)."""
        self._models: dict[str, PreTrainedModel] = {}
        self._tokenizers: dict[str, Any] = {}
        self._data: dict[tuple[str, str], list[dict[str, Any]]] = {}

    # models ------------------------------------------------------------------------------

    def _skeleton(self, folder: Path) -> tuple[PreTrainedModel, str]:
        import transformers

        kind, config = self._check_kind(folder)
        key = json.dumps(config, sort_keys=True)
        if key not in self._models:
            cls = getattr(transformers, config["architectures"][0], None)
            if cls is None:
                raise SourceError(
                    f"{folder}: transformers has no {config['architectures'][0]}", path=folder
                )
            cfg = transformers.AutoConfig.from_pretrained(folder)
            with torch.device(self.device):
                model = cls(cfg).float()
            self._models[key] = model.eval()
        return self._models[key], kind

    def _check_kind(self, folder: Path) -> tuple[str, dict[str, Any]]:
        """The folder's model kind and config; an error where the metric does not apply."""
        kind, config = model_kind(folder)
        if self.metric == "accuracy" and kind != "classification":
            raise RecipeError(
                f"evaluate.metric: accuracy needs a sequence-classification model; "
                f"{folder} holds a {kind} language model (use loss or perplexity)",
                key="evaluate.metric",
            )
        if self.metric == "perplexity" and kind == "classification":
            raise RecipeError(
                f"evaluate.metric: perplexity needs a language model; {folder} holds a "
                "sequence classifier (use loss or accuracy)",
                key="evaluate.metric",
            )
        return kind, config

    def load(self, source: ModelSource) -> tuple[torch.nn.Module, str, Path]:
        """The model of a folder or of merged tensors, its kind, and its tokenizer's folder.

        Scoring runs forward passes, so the whole model is loaded: a folder's tensors are read
        by the runner (``engine/whole.read_whole``), merged ones come from ``merge_state``."""
        if isinstance(source, MergedState):
            model, kind = self._skeleton(source.reference)
            _load_state(model, source.state, str(source.reference))
            return model, kind, source.reference
        if (source / "moe.json").is_file():
            return self._moe(source)
        model, kind = self._skeleton(source)
        checkpoint = Checkpoint(source, str(source))
        state = read_whole(checkpoint, checkpoint.tensor_names())
        _load_state(model, state, str(source))
        return model, kind, source

    def _moe(self, folder: Path) -> tuple[torch.nn.Module, str, Path]:
        """A ``mergecli moe`` output: loaded as it loads (the Arrow peft model over its base, or
        the sparse MoE model); its tokenizer is the base's for Arrow."""
        from mergecli.moe import load, read_manifest

        manifest = read_manifest(folder)
        reference = folder if manifest["kind"] == "sparse" else Path(manifest["base_model"])
        self._check_kind(reference)
        kind, _ = model_kind(reference)
        model = load(folder, dtype=torch.float32).to(self.device).eval()
        return model, kind, reference

    def _tokenizer(self, folder: Path) -> tuple[Any, str]:
        from transformers import AutoTokenizer

        files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        if self.tokenizer_fallback and not any((folder / f).is_file() for f in files):
            folder = self.tokenizer_fallback
        key = _fingerprint(folder, files)
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError) as exc:
                raise SourceError(
                    f"{folder}: cannot load its tokenizer: {exc}", path=folder
                ) from None
        return self._tokenizers[key], key

    # data --------------------------------------------------------------------------------

    def _examples(
        self, task: Task, kind: str, tokenizer: Any, key: str, model: torch.nn.Module
    ) -> list[dict[str, Any]]:
        assert task.data is not None
        cache = (str(task.data), key + kind)
        if cache in self._data:
            return self._data[cache]
        rows = read_examples(task.data, kind == "classification", self.section.limit)
        positions = getattr(model.config, "max_position_embeddings", None) or 512
        limit = self.section.max_length or min(positions, 512)
        encoded = tokenizer(
            [r["text"] for r in rows],
            truncation=True,
            max_length=limit,
            return_special_tokens_mask=True,
        )
        examples = []
        gen = torch.Generator().manual_seed(self.seed)
        for i, ids in enumerate(encoded["input_ids"]):
            example: dict[str, Any] = {"input_ids": list(ids)}
            if kind == "classification":
                example["label"] = rows[i]["label"]
            elif kind == "masked":
                example.update(_mask(ids, encoded["special_tokens_mask"][i], tokenizer, gen))
            elif len(ids) < 2:
                continue
            examples.append(example)
        if not examples:
            raise EvaluationError(f"{task.data}: no text has two tokens to predict")
        self._data[cache] = examples
        return examples

    # scoring -----------------------------------------------------------------------------

    def _ready(self, source: ModelSource) -> tuple[torch.nn.Module, str, Any, str, int]:
        """The model, its kind, its tokenizer, the tokenizer's fingerprint and the pad id."""
        model, kind, tok_folder = self.load(source)
        tokenizer, key = self._tokenizer(tok_folder)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        return model, kind, tokenizer, key, pad

    def score(
        self, source: ModelSource, tasks: list[Task], bar: CountBar | None = None
    ) -> dict[str, float]:
        """The metric on each task's data."""
        bar = bar or CountBar()
        model, kind, tokenizer, key, pad = self._ready(source)
        scores = {}
        for task in tasks:
            examples = self._examples(task, kind, tokenizer, key, model)
            size = self.section.batch_size
            batches = [examples[i : i + size] for i in range(0, len(examples), size)]
            handle = bar.add(f"{self.metric} on {task.name}", len(batches))
            sums = torch.zeros(3, dtype=torch.float64)
            with torch.inference_mode():
                for batch in batches:
                    sums += torch.tensor(
                        _STEPS[kind](model, _collate(batch, pad, self.device), task)
                    )
                    bar.advance(handle)
            bar.done(handle)
            loss, correct, count = sums.tolist()
            if self.metric == "accuracy":
                scores[task.name] = correct / count
            else:
                scores[task.name] = (
                    math.exp(loss / count) if self.metric == "perplexity" else (loss / count)
                )
        return scores

    def predict(self, source: ModelSource, task: Task) -> Predictions:
        """Per-example class probabilities (softmax of the logits, float64) and labels of a
        sequence classifier on one task's data, in file order."""
        model, kind, tokenizer, key, pad = self._ready(source)
        if kind != "classification":
            raise EvaluationError(
                f"evaluate: per-example predictions need a sequence classifier; the model "
                f"holds a {kind} language model"
            )
        examples = self._examples(task, kind, tokenizer, key, model)
        size = self.section.batch_size
        probs, labels = [], []
        with torch.inference_mode():
            for start in range(0, len(examples), size):
                batch = _collate(examples[start : start + size], pad, self.device)
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                _check_labels(batch["label"], logits.shape[-1], task)
                probs.append(logits.double().softmax(-1).cpu())
                labels.append(batch["label"])
        return Predictions(torch.cat(probs), torch.cat(labels))


def _check_labels(labels: torch.Tensor, classes: int, task: Task) -> None:
    if int(labels.max()) >= classes or int(labels.min()) < 0:
        raise EvaluationError(
            f"{task.data}: a label is outside 0…{classes - 1}, the model's classes"
        )


def _load_state(model: PreTrainedModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors into the skeleton; every parameter must come from ``state`` (tied ones
    share storage with one that does)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ShapeError(
            f"{where}: {len(result.unexpected_keys)} tensors do not fit the model built from its "
            f"config (e.g. {result.unexpected_keys[0]})",
            tensor=result.unexpected_keys[0],
        )
    model.tie_weights()
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in state}
    absent = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if absent:
        raise ShapeError(f"{where}: tensor '{absent[0]}' of the model is missing", tensor=absent[0])


def _mask(
    ids: list[int], special: list[int], tokenizer: Any, gen: torch.Generator
) -> dict[str, Any]:
    if tokenizer.mask_token_id is None:
        raise EvaluationError("evaluate: the masked LM's tokenizer has no mask token")
    candidates = [i for i, s in enumerate(special) if not s] or list(range(len(ids)))
    draw = torch.rand(len(candidates), generator=gen) < MASK_RATE
    chosen = [p for p, d in zip(candidates, draw.tolist(), strict=True) if d]
    if not chosen:
        chosen = [candidates[int(torch.randint(len(candidates), (1,), generator=gen))]]
    labels = [-100] * len(ids)
    masked = list(ids)
    for p in chosen:
        labels[p], masked[p] = ids[p], tokenizer.mask_token_id
    return {"input_ids": masked, "labels": labels}


def _collate(batch: list[dict[str, Any]], pad: int, device: torch.device) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask and labels when the examples have them."""
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        mask[row, :n] = 1
        if "labels" in e:
            labels[row, :n] = torch.tensor(e["labels"])
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels}
    if "label" in batch[0]:
        out["label"] = torch.tensor([e["label"] for e in batch])
    return out


Sums = tuple[float, float, float]
"""Per batch: summed loss, correct predictions (classification), items scored."""


def _causal(model: torch.nn.Module, batch: dict[str, Any], task: Task) -> Sums:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    loss = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
    )
    return float(loss), 0.0, float((targets != -100).sum())


def _masked(model: torch.nn.Module, batch: dict[str, Any], task: Task) -> Sums:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].to(logits.device)
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return float(loss), 0.0, float((labels != -100).sum())


def _classify(model: torch.nn.Module, batch: dict[str, Any], task: Task) -> Sums:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["label"].to(logits.device)
    _check_labels(labels, logits.shape[-1], task)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return float(loss), float((logits.argmax(-1) == labels).sum()), float(len(labels))


_STEPS: dict[str, Callable[[torch.nn.Module, dict[str, Any], Task], Sums]] = {
    "causal": _causal,
    "masked": _masked,
    "classification": _classify,
}
