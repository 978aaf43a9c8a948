"""Serving engine: paged KV cache, in-flight batching, chunked prefill, per-request sampling, streaming."""

from moejax.engine.engine import Engine, EngineStats, RequestOutput, ServeConfig
from moejax.engine.sampling import SamplingParams
from moejax.engine.scheduler import Request

__all__ = ["Engine", "EngineStats", "Request", "RequestOutput", "SamplingParams", "ServeConfig"]
