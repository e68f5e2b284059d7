"""dicomnode.ops.prometheus: the Prometheus registry (counters, gauges, histograms), its text
format, thread safety, and collectors run at scrape time."""

from __future__ import annotations

import threading

import pytest

from dicomnode.ops import prometheus as metrics


def test_counter_and_histogram_render_prometheus_text() -> None:
    registry = metrics.Registry()
    requests = registry.counter("x_requests_total", "Requests.", ["code"])
    latency = registry.histogram("x_seconds", "Latency.", ["stage"], buckets=(0.1, 1.0))
    plain = registry.counter("x_plain_total", 'A "quoted" help.')
    requests.inc(code="200")
    requests.inc(2, code='5"0\n0')
    for value in (0.05, 0.5, 5.0):
        latency.observe(value, stage="model")
    text = registry.render()
    assert "# TYPE x_requests_total counter" in text
    assert 'x_requests_total{code="200"} 1' in text
    assert 'x_requests_total{code="5\\"0\\n0"} 2' in text
    assert 'x_seconds_bucket{stage="model",le="0.1"} 1' in text
    assert 'x_seconds_bucket{stage="model",le="1"} 2' in text
    assert 'x_seconds_bucket{stage="model",le="+Inf"} 3' in text
    assert 'x_seconds_sum{stage="model"} 5.55' in text
    assert 'x_seconds_count{stage="model"} 3' in text
    assert "x_plain_total 0" in text  # an unlabelled counter exists before it counts
    assert plain.value() == 0
    with pytest.raises(ValueError):
        requests.inc(-1, code="200")
    with pytest.raises(ValueError):
        requests.inc(stage="x")  # wrong label names
    with pytest.raises(ValueError):
        registry.gauge("x_requests_total", "again, as another type")


def test_metrics_are_thread_safe_and_collectors_run_at_scrape() -> None:
    registry = metrics.Registry()
    counter = registry.counter("t_total", "t")
    gauge = registry.gauge("t_depth", "d", ["queue"])

    def work() -> None:
        for _ in range(2000):
            counter.inc()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.value() == 16000
    registry.add_collector(lambda: gauge.replace({("jobs",): 3}))

    def broken() -> None:
        raise RuntimeError("database down")
    registry.add_collector(broken)  # a failing collector does not break the scrape
    assert 't_depth{queue="jobs"} 3' in registry.render()
