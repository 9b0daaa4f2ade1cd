"""Images for vision-language models: loading and limits (tokenizer process), placeholder
expansion and hashing, M-RoPE positions, the prefix-cache key of image tokens, and the
prefill worker's encoded-image cache."""
