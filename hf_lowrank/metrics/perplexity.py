"""Token-weighted perplexity from per-window negative log-likelihood sums, as an `evaluate` metric.

The Hub's ``perplexity`` metric runs a model itself and is fetched over the network; this one only aggregates
numbers that the caller computed (``hf_lowrank.evaluation`` slides the windows), so any model, device and
batching can feed it, several processes can add batches, and it loads offline with
``evaluate.load("/path/to/perplexity.py")``. It imports only ``math``, ``datasets`` and ``evaluate``.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity of a causal language model over a token stream: exp(total NLL / total predicted tokens), in nats.
Each input row is one scored window (or any other chunk): the sum of the negative log-likelihoods (natural log) of
the tokens it predicts, and how many tokens that is. Rows are weighted by their token counts, so the result is
the per-token perplexity of the whole stream, not a mean of per-window perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): per row, the summed negative log-likelihood (nats) of its predicted tokens.
    num_tokens (`list[int]`): per row, how many tokens were predicted (≥ 0).
Returns:
    perplexity (`float`): exp(loss).
    loss (`float`): mean NLL per predicted token (nats), sum(nll_sum) / sum(num_tokens).
    tokens (`int`): sum(num_tokens).
Examples:
    >>> metric = evaluate.load("hf_lowrank/metrics/perplexity.py")
    >>> metric.compute(nll_sum=[2.0, 4.0], num_tokens=[1, 2])
    {'perplexity': 7.38905609893065, 'loss': 2.0, 'tokens': 3}
"""

_CITATION = """
@misc{hf_perplexity_fixed_length,
  title = {Perplexity of fixed-length models},
  howpublished = {\\url{https://huggingface.co/docs/transformers/perplexity}},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, nll_sum, num_tokens):
        if any(n < 0 for n in num_tokens):
            raise ValueError("`num_tokens` must be non-negative.")
        tokens = int(sum(num_tokens))
        if tokens == 0:
            raise ValueError("No predicted tokens: perplexity is undefined (is the text shorter than two tokens?).")
        loss = math.fsum(nll_sum) / tokens
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens}
