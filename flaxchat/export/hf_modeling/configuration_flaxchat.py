"""FlaxchatConfig: the Hugging Face config of a flaxchat (nanochat-architecture) GPT.

Copied into exports next to modeling_flaxchat.py; imports transformers only. The exporter writes
config.json with flaxchat/export/hf_config.py (torch-free) and the two must agree field for field.
"""

from transformers import PretrainedConfig


class FlaxchatConfig(PretrainedConfig):
    """Shape and policy of the model. `window_sizes[i]` is layer i's attention window in tokens:
    query t sees keys k with 0 <= t - k <= window (a window >= the sequence length is plain causal)."""

    model_type = "flaxchat"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head"}

    def __init__(self, vocab_size=512, padded_vocab_size=None, n_layer=2, n_head=2, n_kv_head=None, n_embd=128,
                 head_dim=None, sequence_len=256, window_sizes=None, softcap=15.0, rope_base=100000.0,
                 max_position_embeddings=None, use_cache=True, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, tie_word_embeddings=False, **kwargs):
        self.vocab_size = int(vocab_size)
        self.padded_vocab_size = int(padded_vocab_size or ((vocab_size + 63) // 64) * 64)
        self.n_layer = int(n_layer)
        self.n_head = int(n_head)
        self.n_kv_head = int(n_kv_head or n_head)
        self.n_embd = int(n_embd)
        self.head_dim = int(head_dim or n_embd // n_head)
        self.sequence_len = int(sequence_len)
        self.window_sizes = [int(w) for w in (window_sizes or [sequence_len] * n_layer)]
        self.softcap = float(softcap)
        self.rope_base = float(rope_base)
        self.max_position_embeddings = int(max_position_embeddings or sequence_len)
        self.use_cache = use_cache
        if len(self.window_sizes) != self.n_layer:
            raise ValueError(f"window_sizes has {len(self.window_sizes)} entries for n_layer={self.n_layer}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
