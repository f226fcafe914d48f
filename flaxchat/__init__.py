"""flaxchat: nanochat's LLM pipeline in JAX/Flax NNX (see README.md and docs/ARCHITECTURE.md)."""

from flaxchat.host_memory import keep_freed_memory

keep_freed_memory()     # before JAX starts its threads (why: flaxchat/host_memory.py)
