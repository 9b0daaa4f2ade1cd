"""Configuration: the engine, scheduler and model settings, the topology file, sampling parameters
and the specs each process is started with. Plain frozen dataclasses, validated once."""
