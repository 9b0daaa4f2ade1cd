"""Entry points: the `pdserve` CLI, the launcher of the process tree, and the Python Engines."""
