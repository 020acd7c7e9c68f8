"""SAE evaluation: reconstruction and downstream metrics with bootstrap intervals, dictionary comparison.

    from saelab.evals import evaluate, compare
    result = evaluate(lm, sae, tokens=10_000, out="runs/eval")   # eval.json + report.html
    compare(sae_a, sae_b, hungarian=True).mcs
"""

from saelab.evals.dictionaries import Comparison, compare
from saelab.evals.run import EvalConfig, evaluate

__all__ = ["Comparison", "EvalConfig", "compare", "evaluate"]
