"""spec.dataset.testSplit/testUri and spec.evaluation: what combines, with the words the apiserver's CEL rules
use too (tests/unit/test_crd.py checks every rule is in the CRD), and the result's shape."""
from __future__ import annotations

import pytest

from kubetune.api.v1alpha1 import ResultStatus

from builders import job, parse_errors, spec


@pytest.mark.parametrize("changes,message", [
    ({"dataset__testUri": "s3://data/test.jsonl", "dataset__testSplit": 0.2},
     "set dataset.testUri or dataset.testSplit, not both"),
    ({"dataset__testSplit": 0.5, "dataset__validationSplit": 0.5},
     "dataset.validationSplit plus dataset.testSplit must leave training data (their sum below 1)"),
    ({"evaluation": {"maxNewTokens": 32}},
     "evaluation needs something to evaluate: test data (dataset.testSplit or dataset.testUri) or prompts "
     "(evaluation.prompts or evaluation.promptsUri)"),
    ({"dataset__testSplit": 0.2, "evaluation": {"temperature": -1}}, "spec.evaluation.temperature"),
    ({"evaluation": {"prompts": [{"prompt": ""}]}}, "spec.evaluation.prompts[0].prompt"),
    ({"dataset__testSplit": 1.0}, "spec.dataset.testSplit"),
])
def test_what_does_not_combine_is_refused_by_name(changes, message):
    assert message in parse_errors(job("ev", **changes))


def test_test_data_alone_is_evaluated_with_the_defaults():
    s = spec(dataset__testSplit=0.2, dataset__validationSplit=0.1)
    assert s.evaluation is None and s.dataset.test_split == 0.2
    e = spec(evaluation={"prompts": [{"prompt": "Hi", "reference": "Hello"}]}).evaluation
    assert (e.max_prompts, e.max_new_tokens, e.temperature) == (64, 128, 0.0)  # greedy by default
    assert spec(dataset__testUri="s3://data/test.jsonl", evaluation={"promptsUri": "s3://data/p.jsonl"})


def test_the_result_carries_base_tuned_delta_and_the_report():
    r = ResultStatus.model_validate({"evaluation": {"base": {"exactMatch": 0.1}, "tuned": {"exactMatch": 0.9},
                                                    "delta": {"exactMatch": 0.8}, "headline": "exactMatch +0.80"},
                                     "reportUri": "s3://out/run-1/evaluation/report.html"})
    dumped = r.model_dump(by_alias=True, exclude_none=True)
    assert dumped["evaluation"]["delta"] == {"exactMatch": 0.8} and dumped["reportUri"].endswith("report.html")
