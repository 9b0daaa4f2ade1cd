"""How long xgrammar takes over large and deep JSON schemas: the figures behind pdserve's grammar
limits (`router.limits.max_grammar_chars`, `grammar_check.MAX_SCHEMA_DEPTH`).

    python benchmarks/grammar_limits.py                 # the table in the README's limits
    python benchmarks/grammar_limits.py --quick         # small sizes only (seconds)

Two shapes: an object of n optional string properties (the compile grows faster than the text)
and n nested objects (the parse, which runs on the tokenizer's loop, grows faster than the
depth). The compile uses a 128,000-token synthetic vocabulary (random letter strings), the size of
Llama 3's, on one thread.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from pdserve.grammar_check import json_depth


def optional_properties(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(n)}}


def nested_objects(n: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(n):
        schema = {
            "type": "object",
            "properties": {"a": schema, "b": {"type": "integer"}},
            "required": ["a"],
        }
    return schema


def synthetic_vocab(size: int) -> list[str]:
    rng = random.Random(0)
    vocab = set('abcdefghijklmnopqrstuvwxyz0123456789 "{}[]:,._-\n')
    while len(vocab) < size - 1:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        vocab.add(rng.choice(["", " ", '"']) + word + rng.choice(["", '"', ":", ","]))
    return [*sorted(vocab), "</s>"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and vocabulary only")
    args = parser.parse_args(argv)
    import xgrammar as xgr

    vocab = synthetic_vocab(8_000 if args.quick else 128_000)
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[len(vocab) - 1])
    widths = (100, 500) if args.quick else (500, 2000, 7000)
    depths = (16, 64) if args.quick else (64, 128, 400)
    print(f"vocabulary {len(vocab)} tokens; one compile thread")
    print("| schema | characters | JSON depth | parse s | compile s |")
    print("|---|---|---|---|---|")
    for name, schema in [
        *((f"{n} optional properties", optional_properties(n)) for n in widths),
        *((f"{n} nested objects", nested_objects(n)) for n in depths),
    ]:
        text = json.dumps(schema)
        start = time.perf_counter()
        grammar = xgr.Grammar.from_json_schema(text)
        parsed = time.perf_counter() - start
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        start = time.perf_counter()
        compiler.compile_grammar(grammar)
        compiled = time.perf_counter() - start
        print(f"| {name} | {len(text):,} | {json_depth(text)} | {parsed:.2f} | {compiled:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
