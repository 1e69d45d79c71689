import io
import json
import math

import pytest
from rich.console import Console

from dora.telemetry.metrics import JsonlLogger, MetricBag, Reduce, read_jsonl
from dora.telemetry.progress import ProgressDisplay
from dora.telemetry.timeline import Timeline, load_spans


def test_metric_bag_reduces_by_declared_kind():
    bag = MetricBag()
    bag.add("loss", 1.0, Reduce.MEAN, weight=3)
    bag.add("loss", 3.0, Reduce.MEAN, weight=1)
    bag.add("grad_norm", 2.0, Reduce.MAX)
    bag.add("grad_norm", 5.0, Reduce.MAX)
    bag.add("tokens", 4, Reduce.SUM)
    bag.add("tokens", 6, Reduce.SUM)
    assert bag.compute() == {"loss": 1.5, "grad_norm": 5.0, "tokens": 10.0}
    with pytest.raises(ValueError, match="grad_norm"):
        bag.add("grad_norm", 1.0, Reduce.MEAN)


def test_jsonl_logger_writes_one_parseable_object_per_step(tmp_path):
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log({"reward_mean": 0.5, "live_versions": [1, 2], "loss": math.nan}, step=0)
    logger.log({"reward_mean": 0.7, "live_versions": [2]}, step=1)
    logger.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["live_versions"] == [1, 2] and rows[0]["loss"] is None


def test_timeline_round_trips_spans_per_lane(tmp_path):
    clock = iter([0.0, 1.0, 2.5]).__next__
    timeline = Timeline(clock=clock)
    timeline.span("engine 0", "group 3", 0.1, 0.6, version=2)
    with timeline.measure("trainer", "step 0", version=2):
        pass
    spans = load_spans(timeline.save(tmp_path / "t.json"))
    assert spans["engine 0"][0]["args"]["version"] == 2
    assert spans["trainer"][0]["start"] == pytest.approx(1.0) and spans["trainer"][0]["end"] == pytest.approx(2.5)
    json.loads((tmp_path / "t.json").read_text())  # valid Chrome-trace JSON


def test_progress_plain_lines_show_versions_and_staleness():
    out = io.StringIO()
    display = ProgressDisplay(total_steps=2, console=Console(file=out, width=200), live=False)
    display.update(0, {"version": 3, "live_versions": [3, 4], "staleness_max": 1, "reward_mean": 0.25})
    display.close()
    line = out.getvalue()
    assert "step 1/2" in line and "live=v3,v4" in line and "stale<=1" in line and "reward=0.250" in line
