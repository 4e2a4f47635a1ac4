"""Prometheus text exposition (format 0.0.4) of the server's counters: a few numbers need no client
library."""

from __future__ import annotations

import threading
from collections import Counter

PREFIX = "gpt_sovits"
FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds


class Metrics:
    """Thread-safe counters; `render` writes them with the gauges the caller passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.errors: Counter[str] = Counter()  # synthesis failures by stage
        self.cancelled = 0
        self.audio_seconds = 0.0
        self._buckets = [0] * len(FIRST_AUDIO_BUCKETS)
        self._first_count = 0
        self._first_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def error(self, stage: str) -> None:
        with self._lock:
            self.errors[stage] += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def audio(self, seconds: float) -> None:
        with self._lock:
            self.audio_seconds += seconds

    def first_audio(self, seconds: float) -> None:
        with self._lock:
            self._first_count += 1
            self._first_sum += seconds
            for i, bound in enumerate(FIRST_AUDIO_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """`gauges`: name -> (help, value)."""
        p = PREFIX
        lines = [f"# HELP {p}_requests_total HTTP responses by endpoint and status.",
                 f"# TYPE {p}_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [f"# HELP {p}_synthesis_errors_total Syntheses that failed, by when (before_audio, mid_stream).",
                      f"# TYPE {p}_synthesis_errors_total counter"]
            for stage, n in sorted(self.errors.items()):
                lines.append(f'{p}_synthesis_errors_total{{stage="{stage}"}} {n}')
            lines += [f"# HELP {p}_cancelled_total Syntheses stopped because the client went away.",
                      f"# TYPE {p}_cancelled_total counter", f"{p}_cancelled_total {self.cancelled}",
                      f"# HELP {p}_audio_seconds_total Seconds of audio sent.",
                      f"# TYPE {p}_audio_seconds_total counter", f"{p}_audio_seconds_total {self.audio_seconds:.6f}",
                      f"# HELP {p}_first_audio_seconds Time from request to the first audio chunk.",
                      f"# TYPE {p}_first_audio_seconds histogram"]
            for bound, n in zip(FIRST_AUDIO_BUCKETS, self._buckets):
                lines.append(f'{p}_first_audio_seconds_bucket{{le="{bound:g}"}} {n}')
            lines += [f'{p}_first_audio_seconds_bucket{{le="+Inf"}} {self._first_count}',
                      f"{p}_first_audio_seconds_sum {self._first_sum:.6f}",
                      f"{p}_first_audio_seconds_count {self._first_count}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value:g}"]
        return "\n".join(lines) + "\n"
