"""Merges over a new vocabulary: mergekit's tokenizer_source union, the tokenizer: section."""

from mergecli.vocab.plan import Vocabulary, plan_vocabulary

__all__ = ["Vocabulary", "plan_vocabulary"]
