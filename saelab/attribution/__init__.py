"""Attribution: which SAE features drive a metric (act x gradient), checked by ablating them."""

from saelab.attribution.attribute import attribute
from saelab.attribution.metrics import (
    ContinuationLogProb,
    LogitDiff,
    LogitsMetric,
    Metric,
    MetricBatch,
    MetricError,
    last_item_last_token,
    parse_metric,
)
from saelab.attribution.result import Attribution, FeatureStat, Pair, SiteAttribution, aggregate
from saelab.attribution.verify import Check, Verification, verify

__all__ = ["attribute", "ContinuationLogProb", "LogitDiff", "LogitsMetric", "Metric", "MetricBatch",
           "MetricError", "last_item_last_token", "parse_metric", "Attribution", "FeatureStat", "Pair",
           "SiteAttribution", "aggregate", "Check", "Verification", "verify"]
