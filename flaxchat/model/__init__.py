"""The model: nanochat's GPT as pure functions over a parameter tree (`gpt`), its attention and RoPE
(`attention`), the KV cache and one-token decode (`kv_cache`), and nanochat's FLOPs/parameter counts (`flops`)."""
