"""The "classification" step: top-k answers from a model's class scores.

The arithmetic and the declaration's checks are appliance/preprocess/classify.py (keys
`output`, `softmax`, `labels`, `top_k`). The step reads the scores output and writes
`top_k_indices`, `top_k_scores` and, with labels, `top_k_labels`. It answers only when the
request asks (parameter `top_k`, or the declaration's own `top_k`): with no k it writes nothing,
and a request that names one of its outputs without a k is refused (400) by name. Which model
outputs to compute and which to return when a client names outputs is the chain's business
(appliance/steps/chain.py), the same for every output step.

Inside a pipeline the scores' spec may not be known: `output` must then name the tensor read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidInput
from ..preprocess.classify import OUTPUTS, ClassifySpec
from ..tensors import Signature, TensorSpec
from .base import Array, Arrays, Step, StepCall, StepContext
from .where import model_where


class ClassifyStep(Step):
    type = "classification"
    parameters = {
        "top_k": "how many classes to answer with, best first (0: no classification answer)",
        "softmax": "true/false: scores as softmax probabilities (overrides the declaration)",
    }

    def __init__(self, spec: ClassifySpec) -> None:
        self.spec = spec
        self.reads = (spec.output,)
        self.writes = OUTPUTS if spec.labels is not None else OUTPUTS[:2]

    @classmethod
    def parse(cls, config: Mapping[str, Any], ctx: StepContext) -> ClassifyStep:
        obj = dict(config)
        if ctx.config is not None:
            what, section = model_where(ctx)
        else:
            what, section = ctx.where, "step"
        outputs = tuple(ctx.available.values())
        name = obj.get("output")
        if ctx.config is None and isinstance(name, str) and name not in ctx.available:
            # a pipeline whose upstream spec is not known: [batch, classes] of anything
            outputs = (*outputs, TensorSpec(name, "FP32", (-1, -1)))
        return cls(ClassifySpec.parse(obj, Signature((), outputs), what, section))

    def specs(self, given: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        scores = given.get(self.spec.output)
        lead = scores.shape[:-1] if scores is not None else (-1,)
        shape = (*lead, -1)
        out = {
            "top_k_indices": TensorSpec("top_k_indices", "INT64", shape),
            "top_k_scores": TensorSpec("top_k_scores", "FP32", shape),
            "top_k_labels": TensorSpec("top_k_labels", "BYTES", shape),
        }
        return {n: out[n] for n in self.writes}

    def run(self, tensors: Mapping[str, Array], call: StepCall) -> Arrays:
        k, softmax = self.spec.requested(dict(call.parameters))
        if not k:
            named = sorted(set(self.writes) & call.wanted) if call.wanted is not None else []
            if named:
                raise InvalidInput(
                    f"outputs {', '.join(named)} need the parameter top_k (how many classes)"
                )
            return {}
        return self.spec.answer(tensors[self.spec.output], k, softmax)

    def describe(self) -> dict[str, Any]:
        return self.spec.to_json()
