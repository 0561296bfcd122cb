"""The Grafana dashboard (deploy/grafana/csmserve-replicas.json) reads metrics csmserve exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from csmserve.engine import Capacity
from csmserve.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "csmserve-replicas.json"


def exported_names() -> set[str]:
    """Every sample name the exposition has (counters' _total, histograms' _bucket/_sum/_count), the
    engine's figures included (read from its capacity at scrape time)."""
    metrics = Metrics()
    metrics.watch_capacity(lambda: Capacity(max_batch=8))
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def test_every_panel_queries_metrics_that_csmserve_exports_per_replica():
    """Each query names only exported metrics and keeps to the chosen replicas ($replica)."""
    dashboard = json.loads(DASHBOARD.read_text())
    names = exported_names()
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs
    for expr in exprs:
        used = set(re.findall(r"\b(csm_[a-z_]+)\b", expr))
        assert used and used <= names, expr
        assert 'replica=~"$replica"' in expr, expr


def test_the_dashboard_shows_streams_ttfa_rtf_and_queue_per_replica():
    """Streams, time to first audio, real-time factor and queue each have a panel split by replica."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    by_metric = {
        metric: [p for p in panels if any(metric in t["expr"] and "by (replica" in t["expr"] for t in p["targets"])]
        for metric in ("csm_active_streams", "csm_time_to_first_audio_seconds", "csm_real_time_factor", "csm_queue_depth")
    }
    assert all(by_metric.values()), by_metric
    assert len({p["id"] for p in panels}) == len(panels)
