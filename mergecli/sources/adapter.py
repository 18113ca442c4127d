"""A PEFT adapter as an expert: its task vector, one base tensor at a time.

LoRA: τ = s · B A (transposed for ``fan_in_fan_out`` and embeddings), s = α/r, or α/√r with
``use_rslora``; α from ``alpha_pattern``, r the stored rank (checked against ``rank_pattern``).
(IA)³: τ = W ⊙ (l − 1), the exact change its scaling vector l makes to W (and to the bias of
a non-feed-forward layer). Full tensors the adapter saves (``modules_to_save``, embedding
layers) contribute saved − base. Tensors the adapter does not touch have a zero task vector.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import SourceError, did_you_mean
from mergecli.sources.checkpoint import Checkpoint, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
SUPPORTED = ("LORA", "IA3")
LORA_PAIRS = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}
"""peft's key suffix of a LoRA A factor → that of its B factor."""
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA rescales by magnitude vectors at run time",
    "use_qalora": "QA-LoRA pools inputs at run time",
    "layer_replication": "layer replication changes the architecture",
    "target_parameters": "LoRA on nn.Parameter targets is not supported",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between adapters at run time",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "trainable_token_indices": "trainable tokens are not supported",
}
"""Adapter options without an exact weight-space task vector, with the reason given."""


def read_peft_config(folder: Path, label: str) -> Any:
    """The folder's PEFT config (peft's own reader); SourceError when it is not one."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # peft raises ValueError, TypeError, JSON errors...
        where = folder / ADAPTER_CONFIG
        raise SourceError(f"{label}: {where} is not a PEFT config: {exc}", path=where) from None


def peft_type(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def is_lora_b(key: str) -> bool:
    """A LoRA B factor (or its trained bias), which is read with its A."""
    return ".lora_B." in key or key.endswith(".lora_embedding_B")


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key matching a module, as peft matches it: the key
    is a regular expression for the module name's last dotted components."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def is_feedforward(config: Any, module: str) -> bool:
    """Whether an (IA)³ module scales inputs (feed-forward) rather than outputs, as peft decides."""
    modules = config.feedforward_modules or []
    if isinstance(modules, str):
        return re.fullmatch(modules, module) is not None
    return any(module.endswith(m) for m in modules)


@dataclass(frozen=True)
class LowRank:
    """scale · B A (transposed when ``transpose``) from the adapter's A and B tensors."""

    a: str
    b: str
    scale: float
    transpose: bool

    def delta(self, adapter: Adapter, name: str) -> torch.Tensor:
        a, b = adapter.raw(self.a), adapter.raw(self.b)
        product = b @ a
        return (product.T if self.transpose else product).mul(self.scale).contiguous()


@dataclass(frozen=True)
class Scaled:
    """A tensor the adapter adds as is, times a scale (LoRA's trainable bias)."""

    key: str
    scale: float

    def delta(self, adapter: Adapter, name: str) -> torch.Tensor:
        return adapter.raw(self.key).mul(self.scale)


@dataclass(frozen=True)
class Saved:
    """A full tensor the adapter replaces: saved − base."""

    key: str

    def delta(self, adapter: Adapter, name: str) -> torch.Tensor:
        return adapter.raw(self.key) - adapter.base_tensor(name)


@dataclass(frozen=True)
class Rescaled:
    """(IA)³: the base tensor times its scaling vector l, minus the base: W ⊙ (l − 1)."""

    key: str
    transpose: bool

    def delta(self, adapter: Adapter, name: str) -> torch.Tensor:
        base = adapter.base_tensor(name)
        vector = adapter.raw(self.key)
        if self.transpose:
            vector = vector.T
        if base.dim() == 1:  # the bias of a layer whose outputs l scales
            vector = vector.reshape(base.shape)
        return base * (vector - 1)


Term = LowRank | Scaled | Saved | Rescaled


class Adapter:
    """A LoRA or (IA)³ adapter folder over a base checkpoint, read as task vectors.

    It answers like a ``Checkpoint`` of the base's tensors, but ``read`` returns the task vector
    of one tensor, computed when asked from the adapter's small tensors (and the base tensor
    for (IA)³ and saved modules); no delta is kept.
    """

    delta = True
    row_reads = False
    """Some rows of a task vector cost the whole product: tensors stream whole."""

    def __init__(
        self, path: Path, label: str, base: Checkpoint, dtype: torch.dtype = torch.float32
    ) -> None:
        self.path = path
        self.label = label
        self.base = base
        self.dtype = dtype
        self.peft_config = read_peft_config(path, label)
        self.kind = peft_type(self.peft_config)
        self._check_config()
        self.weights = Checkpoint(path, label)
        self.files = self.weights.files
        self.terms: dict[str, list[Term]] = {}
        self._plan_terms()

    def _check_config(self) -> None:
        where = self.path / ADAPTER_CONFIG
        if self.kind not in SUPPORTED:
            raise SourceError(
                f"{self.label}: {where}: {self.kind} adapters have no weight-space task vector; "
                "mergecli merges LORA and IA3 adapters",
                path=where,
            )
        for option, reason in UNSUPPORTED_OPTIONS.items():
            if getattr(self.peft_config, option, None):
                raise SourceError(
                    f"{self.label}: {where} sets {option}: {reason}, so the adapter has no "
                    "exact weight-space task vector",
                    path=where,
                )

    def _plan_terms(self) -> None:
        names = self.weights.tensor_names()
        keys = set(names)
        paired: set[str] = set()
        for key in names:
            if not key.startswith(PEFT_PREFIX):
                self._fail(key, f"does not start with '{PEFT_PREFIX}'")
            inner = key.removeprefix(PEFT_PREFIX)
            suffix = next((s for s in LORA_PAIRS if inner.endswith(s)), None)
            if self.kind == "IA3" and inner.endswith(".ia3_l"):
                self._ia3(key, inner.removesuffix(".ia3_l"))
            elif self.kind == "LORA" and suffix:
                paired |= self._lora(key, keys, inner.removesuffix(suffix), suffix)
            elif self.kind == "LORA" and is_lora_b(key):
                continue  # read with its A
            elif ".lora_" in inner or ".ia3_" in inner:
                self._fail(key, f"is not part of a {self.kind} task vector that mergecli knows")
            else:
                # modules_to_save and saved embedding layers: full tensors of the base
                name = inner.replace(".base_layer.", ".")
                self._add(name, Saved(key), key, self.weights.info(key).shape)
        orphan = next((k for k in names if is_lora_b(k) and k not in paired), None)
        if orphan:
            self._fail(orphan, "has no matching lora_A")

    def _lora(self, key_a: str, keys: set[str], module: str, suffix: str) -> set[str]:
        """Plan one LoRA product; returns the keys it reads besides A (B, and B's bias)."""
        config = self.peft_config
        key_b = key_a.removesuffix(suffix) + LORA_PAIRS[suffix]
        if key_b not in keys:
            self._fail(key_a, f"has no matching '{key_b}'")
        a, b = self.weights.info(key_a).shape, self.weights.info(key_b).shape
        rank = a[0]
        pattern = pattern_key(config.rank_pattern or {}, module)
        want = config.rank_pattern[pattern] if pattern else config.r
        if len(a) != 2 or len(b) != 2 or b[1] != rank or rank != want:
            self._fail(key_a, f"has shape {list(a)} with B {list(b)}; expected rank {want}")
        pattern = pattern_key(config.alpha_pattern or {}, module)
        alpha = config.alpha_pattern[pattern] if pattern else config.lora_alpha
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        embedding = suffix == ".lora_embedding_A"
        transpose = embedding or bool(config.fan_in_fan_out)
        shape = (a[1], b[0]) if transpose else (b[0], a[1])
        self._add(f"{module}.weight", LowRank(key_a, key_b, scale, transpose), key_a, shape)
        bias = f"{key_b.removesuffix('.weight')}.bias"
        if embedding or bias not in keys:
            return {key_b}
        self._add(f"{module}.bias", Scaled(bias, scale), bias, self.weights.info(bias).shape)
        return {key_b, bias}

    def _ia3(self, key: str, module: str) -> None:
        transpose = bool(self.peft_config.fan_in_fan_out)
        name = f"{module}.weight"
        self._add(name, Rescaled(key, transpose), key, None)
        shape = self.weights.info(key).shape
        vector = shape[::-1] if transpose else shape
        feedforward = is_feedforward(self.peft_config, module)
        weight = self.base.info(name).shape
        # l scales outputs (rows of W, columns when W is stored transposed) or, feed-forward,
        # inputs
        rows = feedforward == transpose
        if len(weight) != 2 or vector != ((weight[0], 1) if rows else (1, weight[1])):
            self._fail(key, f"has shape {list(shape)}, which does not scale {name} {list(weight)}")
        if not feedforward and f"{module}.bias" in self.base:
            self._add(f"{module}.bias", Rescaled(key, transpose), key, None)

    def _add(self, name: str, term: Term, key: str, shape: tuple[int, ...] | None) -> None:
        """Attach a term to the base tensor ``name``, checking the base has it, of that shape."""
        if name not in self.base:
            self._fail(
                key,
                f"targets '{name}', which the base {self.base.path} does not have"
                + did_you_mean(name, self.base.tensor_names()),
            )
        want = self.base.info(name).shape
        if shape is not None and tuple(shape) != want:
            self._fail(key, f"changes '{name}' by shape {list(shape)}, the base has {list(want)}")
        self.terms.setdefault(name, []).append(term)

    def _fail(self, key: str, why: str) -> None:
        raise SourceError(
            f"{self.label}: tensor '{key}' in {self.weights.info(key).file} {why}",
            path=self.weights.info(key).file,
        )

    def low_rank(self, name: str) -> LowRank | None:
        """The LoRA product that is the whole task vector of ``name``, if it is one."""
        terms = self.terms.get(name, [])
        return terms[0] if len(terms) == 1 and isinstance(terms[0], LowRank) else None

    def changes(self, name: str) -> bool:
        """Whether the adapter changes the base tensor ``name`` at all."""
        return name in self.terms

    def saves(self, name: str) -> bool:
        """Whether the adapter stores ``name`` whole (``modules_to_save``)."""
        return any(isinstance(t, Saved) for t in self.terms.get(name, []))

    def rank(self, term: LowRank) -> int:
        return self.weights.info(term.a).shape[0]

    def factors(self, term: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale · B, A): the task vector is their product (transposed if ``term.transpose``)."""
        return self.raw(term.b).mul(term.scale), self.raw(term.a)

    def raw(self, key: str) -> torch.Tensor:
        """One of the adapter's own tensors, in the compute dtype."""
        return self.weights.read(key).to(self.dtype)

    def base_tensor(self, name: str) -> torch.Tensor:
        return self.base.read(name).to(self.dtype)

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The task vector of one base tensor (zeros where the adapter does not touch it), or
        its rows ``start:stop``."""
        terms = self.terms.get(name)
        if not terms:
            out = torch.zeros(self.base.info(name).shape, dtype=self.dtype)
        else:
            out = terms[0].delta(self, name)
            for term in terms[1:]:
                out += term.delta(self, name)
        return out if rows is None else out[rows[0] : rows[1]]

    def config(self) -> dict[str, Any] | None:
        return self.base.config()

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def fingerprint(self) -> str:
        """The adapter's weights fingerprint combined with its config file."""
        digest = hashlib.sha256(self.weights.fingerprint().encode())
        digest.update((self.path / ADAPTER_CONFIG).read_bytes())
        return digest.hexdigest()[:16]
