"""The special tokens and split pattern shared by the tokenizer and the config check.

Kept in a module with no heavy imports so that validating a config never pulls in
rustbpe/tiktoken.
"""

# nanochat's 9 special tokens, appended after the merges in this order.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
)

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3} (nanochat): fewer tokens are
# spent on number chunks at small vocab sizes.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
