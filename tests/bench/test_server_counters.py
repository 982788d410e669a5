"""Reading a server's Prometheus counters around a run."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fitserve.bench.server_counters import counter_deltas, read_counters

METRICS_TEXT = """\
# HELP demo_preemptions_total Requests preempted.
# TYPE demo_preemptions_total counter
demo_preemptions_total{model="a"} 3.0
demo_preemptions_total{model="b"} 4.0
# HELP demo_running Requests running.
# TYPE demo_running gauge
demo_running 2.0
"""


@pytest.fixture
def metrics_server():
    """A server answering /metrics with METRICS_TEXT, anything else with 404."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = METRICS_TEXT.encode() if self.path == "/metrics" else b"no"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_counters_are_summed_over_labels_and_gauges_left_out(metrics_server: str) -> None:
    assert read_counters(metrics_server) == {"demo_preemptions_total": 7.0}


def test_a_server_without_metrics_gives_none() -> None:
    assert read_counters("http://127.0.0.1:9", timeout_s=0.5) is None  # nothing listens on the discard port
    assert counter_deltas(None, {"a_total": 1.0}) is None


def test_deltas_count_new_counters_from_zero() -> None:
    assert counter_deltas({"a_total": 2.0}, {"a_total": 5.0, "b_total": 1.0}) == {"a_total": 3.0, "b_total": 1.0}
