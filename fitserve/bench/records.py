"""What the load client records about one request: raw timestamps, no derived statistics.

Kept apart from the formulas (metrics.py) so the JSON/CSV report can store exactly what was
observed and anyone can recompute every number from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    """Timings of one HTTP request, all in seconds on the client's monotonic clock."""

    request_id: int
    """Position in the run (0-based); turns of a conversation get consecutive ids."""
    conversation_id: int
    """Conversation the request belongs to (equal to the request id for single-turn workloads)."""
    turn_index: int
    """0 for the first turn of a conversation."""
    scheduled_s: float
    """When the arrival process wanted the request sent, relative to the start of the run."""
    sent_s: float
    """When the request was actually sent (later than scheduled_s if the concurrency cap held it)."""
    input_tokens: int
    """Prompt tokens: the server's `usage.prompt_tokens` when reported, else the workload's count."""
    requested_output_tokens: int
    """max_tokens sent with the request."""
    output_tokens: int = 0
    """Generated tokens: the server's `usage.completion_tokens`, else the number of content chunks."""
    output_tokens_source: str = "chunks"
    """"usage" or "chunks": where output_tokens came from."""
    chunk_times_s: list[float] = field(default_factory=list)
    """Arrival of every streamed chunk that carried text, relative to sent_s."""
    end_s: float | None = None
    """When the response stream closed, relative to sent_s."""
    success: bool = False
    error: str | None = None
    """Why the request failed ("timeout", "HTTP 500: ...", ...); None on success."""
    client: str | None = None
    """multi-tenant: the client that sent it (its `user` field)."""
    output_text: str = ""
    """Generated text; needed to continue multi-turn conversations, dropped from reports."""

    @property
    def ttft_s(self) -> float | None:
        """First streamed token received − request sent."""
        return self.chunk_times_s[0] if self.success and self.chunk_times_s else None

    @property
    def e2e_s(self) -> float | None:
        """Last token received − request sent."""
        return self.chunk_times_s[-1] if self.success and self.chunk_times_s else None

    def to_row(self) -> dict:
        """A JSON-friendly dict of what was observed (the generated text is left out)."""
        row = asdict(self)
        row.pop("output_text")
        return row
