"""The service's counters, gauges and histograms, rendered in Prometheus' text format (version 0.0.4)."""

from __future__ import annotations

import threading

# name -> (type, help, histogram buckets)
SPEC = {
    "streamvln_steps_total": ("counter", "Frames stepped (one per answered step request).", None),
    "streamvln_decisions_total": ("counter", "Model decisions (sessions whose action queue was empty).", None),
    "streamvln_model_calls_total": ("counter", "Batched agent calls.", None),
    "streamvln_batch_size": ("histogram", "Sessions decided per batched agent call.", (1, 2, 4, 8, 16, 32, 64)),
    "streamvln_model_call_seconds": ("histogram", "Wall time of one batched agent call.",
                                     (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
    "streamvln_step_latency_seconds": ("histogram", "Step request latency, body received to answer ready.",
                                       (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)),
    "streamvln_sessions": ("gauge", "Open sessions.", None),
    "streamvln_sessions_created_total": ("counter", "Sessions created.", None),
    "streamvln_sessions_expired_total": ("counter", "Sessions closed for being idle.", None),
    "streamvln_errors_total": ("counter", "Refused or failed requests by kind.", None),
}


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple, float] = {}  # (name, labels) -> value (counters, gauges)
        self._hist: dict[str, list] = {n: [[0] * len(s[2]), 0, 0.0] for n, s in SPEC.items() if s[0] == "histogram"}

    def inc(self, name: str, by: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + by

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, ())] = value

    def observe(self, name: str, value: float) -> None:
        buckets = SPEC[name][2]
        with self._lock:
            counts, _, _ = h = self._hist[name]
            for k, edge in enumerate(buckets):
                if value <= edge:
                    counts[k] += 1
            h[1] += 1
            h[2] += value

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text, buckets) in SPEC.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "histogram":
                    counts, n, total = self._hist[name]
                    for edge, c in zip(buckets, counts):
                        lines.append(f'{name}_bucket{{le="{edge:g}"}} {c}')
                    lines += [f'{name}_bucket{{le="+Inf"}} {n}', f"{name}_sum {total:.6f}", f"{name}_count {n}"]
                    continue
                rows = [(dict(k[1]), v) for k, v in self._values.items() if k[0] == name]
                for labels, v in sorted(rows, key=lambda r: sorted(r[0].items())) or [({}, 0)]:
                    lines.append(f"{name}{_labels(labels)} {v:g}")
        return "\n".join(lines) + "\n"
