"""The server's Prometheus metrics."""


class Metrics:
    """Prometheus metrics in their own registry (several apps may live in one process, e.g. in tests)."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        L = ["model_name"]
        self.labels = {"model_name": model_name}
        self.running = Gauge("dgemma:num_requests_running", "Requests holding a cache row.", L, registry=r)
        self.waiting = Gauge("dgemma:num_requests_waiting", "Requests queued in the engine for a row.", L, registry=r)
        self.prompt_tokens = Counter("dgemma:prompt_tokens", "Prompt tokens of admitted requests.", L, registry=r)
        self.generation_tokens = Counter("dgemma:generation_tokens", "Generated (committed) tokens.", L, registry=r)
        self.finished = Counter("dgemma:request_success", "Finished requests.", L + ["finished_reason"], registry=r)
        self.rejected = Counter(
            "dgemma:request_rejected", "Requests refused or failed, by HTTP status.", L + ["status"], registry=r
        )
        self.aborted = Counter("dgemma:request_aborted", "Requests aborted (disconnect or timeout).", L, registry=r)
        self.tokens_per_forward = Histogram(
            "dgemma:tokens_per_forward",
            "Completion tokens per decoder pass (per token step in AR mode).",
            L,
            buckets=(0.125, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.steps_per_canvas = Histogram(
            "dgemma:denoising_steps_per_canvas",
            "Denoising steps per committed canvas (request average, one observation per canvas).",
            L,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256),
            registry=r,
        )
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
        self.ttft = Histogram(
            "dgemma:time_to_first_token_seconds",
            "Request arrival to first committed tokens.",
            L,
            buckets=lat,
            registry=r,
        )
        self.e2e = Histogram(
            "dgemma:e2e_request_latency_seconds", "Request arrival to completion.", L, buckets=lat, registry=r
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
