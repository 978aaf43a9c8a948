"""Serving engine: paged KV cache, in-flight batching, chunked prefill, per-request sampling, streaming."""

from moejax.engine.engine import Engine, EngineStats, RequestOutput, ServeConfig
from moejax.engine.sampling import SamplingParams
from moejax.engine.scheduler import Request, RequestId

__all__ = ["Engine", "EngineStats", "Request", "RequestId", "RequestOutput", "SamplingParams", "ServeConfig"]
