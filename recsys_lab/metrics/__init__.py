"""torchmetrics.Metric subclasses where torchmetrics has no streaming or grouped equivalent."""

from recsys_lab.metrics.ctr import CTRMetrics, ExactAUC, GroupAUC, group_auc
from recsys_lab.metrics.ranking import FullRankingMetrics
from recsys_lab.metrics.reference import reference_aucs

__all__ = ["CTRMetrics", "ExactAUC", "FullRankingMetrics", "GroupAUC", "group_auc", "reference_aucs"]
