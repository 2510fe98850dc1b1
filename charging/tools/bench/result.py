"""What one mode measured: throughput, latencies, the throughput timeline and the
checker's verdict."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy

BUCKET_S = 0.25  # throughput-over-time resolution
CDF_POINTS = 200  # latency CDF points kept in bench.json


@dataclass
class ModeResult:
    mode: str
    charges: int  # requests that got an outcome in this mode
    seconds: float  # the measured span (see each mode for what it spans)
    check: dict  # the independent checker's report
    ok: bool  # the checker's verdict: clean (or, for naive, its violations counted consistently)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    done_at_s: list[float] = field(default_factory=list, repr=False)  # completion times since the mode started
    percentiles: dict[str, float] | None = None  # when latencies come from elsewhere (redis-benchmark)
    extra: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.charges / self.seconds if self.seconds > 0 else 0.0

    def latency(self) -> dict[str, float] | None:
        if self.percentiles is not None:
            return self.percentiles
        if not self.latencies_ms:
            return None
        p50, p95, p99, p999 = numpy.percentile(self.latencies_ms, [50, 95, 99, 99.9])
        return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "p99.9": float(p999),
                "max": float(max(self.latencies_ms))}

    def timeline(self) -> list[tuple[float, float]]:
        """(seconds since the mode started, charges/s in that bucket)."""
        if not self.done_at_s:
            return []
        counts = numpy.bincount((numpy.asarray(self.done_at_s) / BUCKET_S).astype(int).clip(min=0))
        return [(i * BUCKET_S, n / BUCKET_S) for i, n in enumerate(counts.tolist())]

    def cdf(self) -> list[tuple[float, float]]:
        """(latency ms, share of charges at or below it), thinned to CDF_POINTS."""
        if not self.latencies_ms:
            return []
        ordered = numpy.sort(numpy.asarray(self.latencies_ms))
        picks = numpy.unique(numpy.linspace(0, len(ordered) - 1, min(CDF_POINTS, len(ordered))).astype(int))
        return [(float(ordered[i]), (i + 1) / len(ordered)) for i in picks]

    def as_dict(self) -> dict:
        return {
            "mode": self.mode, "charges": self.charges, "seconds": round(self.seconds, 3),
            "rate_per_s": round(self.rate, 1), "latency_ms": self.latency(), "check": self.check, "ok": self.ok,
            "extra": self.extra, "notes": self.notes,
            "timeline": [(round(t, 2), round(r, 1)) for t, r in self.timeline()],
            "latency_cdf": [(round(ms, 3), round(q, 4)) for ms, q in self.cdf()],
        }
