"""flaxchat: nanochat's LLM pipeline in JAX/Flax NNX (see README.md and docs/ARCHITECTURE.md)."""

from flaxchat.host_memory import keep_freed_memory

keep_freed_memory()     # only with FLAXCHAT_HOST_MALLOC=keep; before JAX starts its threads (flaxchat/host_memory.py)
