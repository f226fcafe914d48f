"""Export a flaxchat tokenizer in the Hugging Face format, so `AutoTokenizer` loads it without code.

`write_hf_tokenizer(tok, dir, model_max_length=...)` writes three files into `dir`:

  tokenizer.json           the `tokenizers` pipeline: pre-tokenizer = our split regex (each match
                           isolated) then ByteLevel (bytes -> GPT-2's printable characters, no prefix
                           space, no second regex), a byte-level BPE model whose vocab ids are our
                           ranks and whose merges are rebuilt from the ranks, a ByteLevel decoder, no
                           normalizer, and the 9 specials as added tokens with our ids.
  tokenizer_config.json    `PreTrainedTokenizerFast`, bos/eos, `model_max_length` and a Jinja chat
                           template that renders exactly as `flaxchat.chat_format` does.
  special_tokens_map.json  the same special tokens, for tools that read only this file.

Why the ids round-trip exactly. tiktoken repeatedly merges the adjacent pair whose concatenation has
the lowest rank (leftmost on ties); HF's BPE repeatedly applies the listed merge with the lowest rank
(also leftmost on ties). For each multi-byte token we list one merge: the two parts that BPE with all
lower ranks leaves when run on the token's own bytes (what tiktoken's `_educational` module and
transformers' `TikTokenConverter` do). Whenever tiktoken forms a token inside a longer piece, the
bytes of that token evolved exactly as they would alone (no merge crossed their boundary), so
tiktoken only ever performs these listed merges and both algorithms take the same steps.
`ignore_merges=True` mirrors tiktoken's shortcut of emitting a whole piece that is itself a token.

Choices a user of the export should know:
  * No post-processor: HF adds no BOS. flaxchat prepends `<|bos|>` itself (documents at pretraining,
    the chat template at chat time), so `encode(text)` equals our `Tokenizer.encode(text)`; a caller
    that wants a document prompt prepends `bos_token_id`.
  * eos_token is `<|assistant_end|>`, the token a chat model emits to end its turn, i.e. the stop
    token for generation. (A base model instead ends a document by starting the next `<|bos|>`.)
  * No pad token is declared; set one (e.g. eos) before padded batching.
  * HF matches special-token strings inside text and turns them into the special ids, while our
    `Tokenizer.encode` keeps them as plain text; ordinary text without them encodes identically.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from flaxchat import storage
from flaxchat.tokenizer import Tokenizer

BOS, EOS = "<|bos|>", "<|assistant_end|>"

# Renders like chat_format.render_conversation (and, with add_generation_prompt, like
# render_for_completion). Every tag strips surrounding template whitespace so only the literal
# strings below reach the output; specials are written literally so the template needs no variables
# beyond `messages` and `add_generation_prompt`. `raise_exception` is a transformers global.
CHAT_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- if messages|length < 2 or messages[1]['role'] != 'user' -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
  {%- endif -%}
  {%- if messages[0]['content'] is not string or messages[1]['content'] is not string -%}
    {{- raise_exception('system and user message content must be strings') -}}
  {%- endif -%}
  {%- set merged = {'role': 'user', 'content': messages[0]['content'] ~ '\n\n' ~ messages[1]['content']} -%}
  {%- set messages = [merged] + messages[2:] -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in messages -%}
  {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
    {{- raise_exception('conversations alternate user/assistant, starting with user') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- if message['content'] is not string -%}
      {{- raise_exception('user content must be a string') -}}
    {%- endif -%}
    {{- '<|user_start|>' ~ message['content'] ~ '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          {{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}
        {%- elif part['type'] == 'python_output' -%}
          {{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
        {%- else -%}
          {{- raise_exception("unknown part type; use 'text', 'python' or 'python_output'") -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
""".strip()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:  # control/space bytes are shifted to 256+ so none is whitespace
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token` using only ranks < max_rank (lowest rank, leftmost first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_index, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_index, best_rank = i, rank
        if best_index is None:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def reconstruct_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge (left, right) that produced each multi-byte token, in rank order."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            # A rank table that did not come from BPE training; HF's BPE could not reproduce it.
            raise ValueError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens "
                             f"(BPE on its bytes leaves {len(parts)} parts); cannot export as HF BPE")
        merges.append((parts[0], parts[1]))
    return merges


def build_hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like `tokenizer` (see module doc)."""
    ranks = tokenizer.mergeable_ranks
    byte_char = bytes_to_unicode()

    def word(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {word(token): rank for token, rank in ranks.items()}
    merges = [(word(left), word(right)) for left, right in reconstruct_merges(ranks)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                                byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        # use_regex=False: the split above already is our regex; GPT-2's would split again.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    # Added in id order right after the ranks, so each gets its flaxchat id (checked below).
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False) for name in tokenizer.special_tokens])
    for name, token_id in tokenizer.special_tokens.items():
        if hf.token_to_id(name) != token_id:
            raise AssertionError(f"special token {name} got HF id {hf.token_to_id(name)}, expected {token_id}")
    return hf


def write_hf_tokenizer(tokenizer: Tokenizer, directory: str, *, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return their names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = list(tokenizer.special_tokens)
    extra = [name for name in specials if name not in (BOS, EOS)]
    special_map = {"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": extra}
    added_tokens_decoder = {
        str(token_id): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True}
        for name, token_id in tokenizer.special_tokens.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "added_tokens_decoder": added_tokens_decoder,
        "model_max_length": int(model_max_length),
        # Decoding must give back the exact text; the cleanup would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    files = {
        "tokenizer.json": build_hf_tokenizer(tokenizer).to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }
    for name, text in files.items():
        storage.write_bytes(directory / name, (text + "\n").encode("utf-8"))
    return list(files)
