"""The advisor for decoder LLMs: next-token agreement on a prompt, latency of the decode step.

An LLM user budgets accuracy as next-token top-1 agreement (or KL divergence) on real text and
latency as the time of one decode step. A 30-layer decoder has ~210 projections; measuring each
technique on each of them alone would take hours. The scan uses what the layers share instead:

- *by role*: a technique is applied to one role (``mlp/up_proj/MatMul``) in every layer at
  once and the prompt's logits are compared before and after (one prefill run each);
- *by layer*: a reference technique (the first variant, INT4) is applied to every role of one
  layer alone, for a few layers (first, last, evenly between; interpolated in between), which
  ranks how sensitive each layer is;
- the error of a technique on role r in layer l is predicted as the role's error times layer l's
  share of the layers' sensitivity (errors in KL add up for small, independent perturbations);
  these errors are measured on the first half of the judged tokens only, and a plan is held to
  the budget on the second half, by a confidence bound (``judged``, ``Budget.confidence``);
- latency: each technique on every node it takes, the whole model timed against the original
  in alternation (decode step by default), and the saving spread over the nodes by the weight
  bytes each one stops reading (a decode step is memory-bound).

The plan is a multiple-choice knapsack over (layer, role) units: at most one technique per unit
(structured pruning of a gated MLP takes its gate, up and down projections together), most
saving within a predicted KL limit, chosen greedily by saving per unit of KL. The limit is then
searched with real measurements: a plan is applied and its top-1 agreement and KL measured on
the prompt; the largest limit whose plan holds the budget wins. Every measured plan is a point
on the frontier (agreement against decode speedup), shown beside the whole-model variants.

Every measurement is cached as soon as it is made (keyed by the model's and prompt's bytes,
the settings, the variants and the onnxruntime and opstudio versions), so an interrupted scan
resumes where it stopped.

The modules, in the order the driver (``driver.advise_llm``) goes through them: ``variants``
(what is tried where), ``scan`` (prepare, time the whole-model variants, judge the units, with
``measure`` and ``judge`` doing the measuring in child processes), ``predict`` (pure functions of
the scan: options, the first limit, whether a measurement holds), ``limits`` (the limit search),
``frontier`` (the points shown) and ``confirm`` (the plans measured and the chosen one timed).
"""

from opstudio.core.plan.llm.advice import (
    Choice,
    FrontierPoint,
    LlmAdvice,
    RoleResult,
    WholeResult,
)
from opstudio.core.plan.llm.confirm import PromptVerifier, StepTimer
from opstudio.core.plan.llm.driver import advise_llm
from opstudio.core.plan.llm.judge import (
    CALIBRATION_TOKENS,
    HeldOut,
    half,
    held_out,
    judged,
    logits_name,
    next_token_error,
)
from opstudio.core.plan.llm.measure import (
    Judge,
    accuracy_in_parallel,
    apply_recipe,
    measure_accuracy,
    measure_speed,
    speed_in_parallel,
)
from opstudio.core.plan.llm.predict import (
    Held,
    Option,
    fit_top1,
    layer_weights,
    most_accurate_of_fastest,
    plan_for_limit,
    sample_layers,
    top1_from_kl,
)
from opstudio.core.plan.llm.variants import (
    LLM_TECHNIQUES,
    Target,
    Variant,
    default_variants,
    find_targets,
    recipe_of,
    variants_for,
)

__all__ = [
    "CALIBRATION_TOKENS", "LLM_TECHNIQUES", "Choice", "FrontierPoint", "Held", "HeldOut", "Judge",
    "LlmAdvice", "Option", "PromptVerifier", "RoleResult", "StepTimer", "Target", "Variant",
    "WholeResult", "accuracy_in_parallel", "advise_llm", "apply_recipe", "default_variants",
    "find_targets", "fit_top1", "half", "held_out", "judged", "layer_weights", "logits_name",
    "measure_accuracy", "measure_speed", "most_accurate_of_fastest", "next_token_error",
    "plan_for_limit", "recipe_of", "sample_layers", "speed_in_parallel", "top1_from_kl",
    "variants_for",
]
