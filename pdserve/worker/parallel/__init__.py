"""Tensor parallelism inside one worker: the rank group and the sharded layers."""
