"""torchmetrics.Metric subclasses where torchmetrics has no streaming or grouped equivalent."""

from recsys_lab.metrics.ctr import CTRMetrics, GroupAUC, group_auc
from recsys_lab.metrics.ranking import FullRankingMetrics

__all__ = ["CTRMetrics", "FullRankingMetrics", "GroupAUC", "group_auc"]
