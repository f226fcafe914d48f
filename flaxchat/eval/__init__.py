"""Base-model evaluation: the CORE metric (DCLM in-context-learning tasks) as nanochat reports it."""
