"""Upcycling experts into a mixture of experts (``mergecli moe``).

LoRA experts become an Arrow MoE built on peft's Arrow support (``moe.arrow``); full
fine-tunes become a sparse MoE model that transformers loads natively (``moe.sparse``, router
rows from ``moe.gates``). ``plan_moe`` validates a recipe from headers, ``run_moe`` writes the
folder, ``load`` returns the model it holds::

    plan = plan_moe(load_recipe("moe.yaml"))
    run_moe(plan, "out/")
    model = load("out/", base)
"""

from mergecli.moe.load import load, read_manifest
from mergecli.moe.output import MoeResult, run_moe
from mergecli.moe.plan import MoePlan, plan_moe

__all__ = ["MoePlan", "MoeResult", "load", "plan_moe", "read_manifest", "run_moe"]
