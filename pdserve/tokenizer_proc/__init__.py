"""The tokenizer process: chat templates, tokenization, length checks, incremental detokenization
and stop strings. Entry point: `tokenizer_process.main(spec)`."""
