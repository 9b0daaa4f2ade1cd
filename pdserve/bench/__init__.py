"""Benchmarks: `pdserve bench serve` (any OpenAI-compatible server) and `pdserve bench offline`
(the in-process Engine)."""
