"""Top-k accuracy as an `evaluate` metric that loads offline from this file.

`evaluate.load(path_to_this_file)` copies it into the modules cache and imports it; nothing is fetched from the Hub.
The script imports only `evaluate`, `datasets` and `numpy`, so it loads without `hf_kdsearch` on the path.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose label is among the k classes the model ranks highest. Top-1 is the
usual accuracy; CIFAR-100 papers also report top-5.

`predictions` are each sample's class ids ranked best first, for example `logits.topk(5).indices`, which keeps the
gathered evaluation output small (k ids per sample instead of C scores). A single id per sample is accepted for top-1.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]` or `list[int]`): class ids per sample, ranked best first; at least max(top_k) per
        sample, or one id per sample when top_k is (1,).
    references (`list[int]`): the true class id of each sample.
    top_k (`tuple[int, ...]`, defaults to `(1, 5)`): the k values to report.

Returns:
    dict: `top{k}` for each k, a fraction in [0, 1].

Example:
    >>> metric = evaluate.load("hf_kdsearch/metrics/topk_accuracy.py")
    >>> metric.compute(predictions=[[3, 1], [0, 2]], references=[1, 0], top_k=(1, 2))
    {'top1': 0.5, 'top2': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        ranked = np.asarray(predictions, dtype=np.int64)
        refs = np.asarray(references, dtype=np.int64)
        if ranked.ndim == 1:
            ranked = ranked[:, None]
        if ranked.ndim != 2 or len(ranked) != len(refs):
            raise ValueError(
                f"predictions must hold one ranked list of class ids per reference; got shape {ranked.shape} for "
                f"{len(refs)} references"
            )
        ks = tuple(int(k) for k in top_k)
        if not ks or min(ks) < 1 or max(ks) > ranked.shape[1]:
            raise ValueError(
                f"top_k={top_k!r} needs every k in [1, {ranked.shape[1]}], the number of ranked ids per sample"
            )
        if len(refs) == 0:
            raise ValueError("top-k accuracy of an empty evaluation set is undefined; got 0 references")
        hits = ranked == refs[:, None]
        # A label appears at most once in a ranking, so "among the first k" is a cumulative hit.
        return {f"top{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
