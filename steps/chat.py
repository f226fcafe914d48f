"""Chat with a trained model in the terminal, streaming the reply as it is generated.

    python -m steps.chat --model /path/to/stage/output            # interactive; /clear, /quit
    python -m steps.chat --model gs://bucket/run/sft -p "Hello"   # one reply, then exit
    python -m steps.chat --model RUN/sft --draft RUN_SMALL/sft     # speculative: a small model drafts

The conversation is kept as messages and re-rendered with the chat template each turn (so the
prompt is exactly what training saw). Text is printed UTF-8-safely: output is held back while
the decoded reply ends in U+FFFD, i.e. while a character is split across tokens.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

from flaxchat.chat import TextStreamer, stop_token_ids

HELP = "commands: /clear starts a new conversation, /quit (or Ctrl-D) exits"


def stream_reply(engine: Any, tokenizer: Any, messages: list[dict[str, str]], out: TextIO,
                 **sampling: Any) -> str:
    """Generate the assistant's next turn for `messages`, writing it to `out` as it arrives."""
    prompt = tokenizer.render_for_completion({"messages": [*messages, {"role": "assistant", "content": ""}]})
    stops = stop_token_ids(tokenizer)
    streamer = TextStreamer(tokenizer)
    pieces: list[str] = []
    for token in engine.stream(prompt, **sampling):
        if int(token) in stops:
            break
        text = streamer.push(token)
        if text:
            pieces.append(text)
            out.write(text)
            out.flush()
    tail = streamer.flush()
    if tail:
        pieces.append(tail)
        out.write(tail)
    out.write("\n")
    out.flush()
    return "".join(pieces)


def chat_loop(engine: Any, tokenizer: Any, read_line: Callable[[str], str], out: TextIO,
              **sampling: Any) -> list[dict[str, str]]:
    """Interactive session; returns the final conversation. `read_line` raises EOFError to end."""
    messages: list[dict[str, str]] = []
    out.write(HELP + "\n")
    while True:
        try:
            line = read_line("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return messages
        if line == "/clear":
            messages = []
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]!r}; {HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("\nAssistant: ")
        out.flush()
        try:
            # a new seed per turn: the same question asked twice may get a different answer
            turn = {**sampling, "seed": sampling.get("seed", 0) + len(messages) // 2}
            reply = stream_reply(engine, tokenizer, messages, out, **turn)
        except KeyboardInterrupt:  # stop this reply, keep the session
            out.write("\n(interrupted)\n")
            messages.pop()
            continue
        except ValueError as exc:  # e.g. the conversation outgrew the model's context
            out.write(f"\nerror: {exc}\n(use /clear to start a new conversation)\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m steps.chat", description="Chat with a trained flaxchat model.")
    p.add_argument("--model", required=True, help="a stage output uri (local or gs://) or its manifest.json")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tools", action="store_true", help="do not run python tool calls")
    p.add_argument("--no-verify", action="store_true", help="skip checking file checksums against the manifest")
    p.add_argument("--draft", default=None, help="a smaller model's stage output (same tokenizer): decode "
                   "speculatively, the draft proposing --spec-k tokens per target forward")
    p.add_argument("--spec-k", type=int, default=4)
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, engine_factory: Callable[..., Any] | None = None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0 or not 0 <= args.top_k <= 200 or not 1 <= args.max_tokens <= 4096:
        print("error: need 0 <= --temperature <= 2, 0 <= --top-k <= 200, 1 <= --max-tokens <= 4096",
              file=sys.stderr)
        return 2
    if not 1 <= args.spec_k <= 16:
        print(f"error: --spec-k {args.spec_k} must be in 1..16 (draft tokens per target forward)", file=sys.stderr)
        return 2
    from flaxchat.chat.loading import load_chat_model

    try:
        loaded = load_chat_model(args.model, verify=not args.no_verify)
        draft = load_chat_model(args.draft, verify=not args.no_verify).model if args.draft else None
        if engine_factory is None:
            from flaxchat.inference.engine import Engine

            def engine_factory(model: Any, tokenizer: Any, max_len: int, draft: Any = None) -> Any:
                return Engine(model, tokenizer, max_len=max_len, draft=draft, spec_k=args.spec_k)
        engine = engine_factory(loaded.model, loaded.tokenizer, loaded.config.model.sequence_len, draft=draft)
    except (ValueError, FileNotFoundError) as exc:  # LoadError, ManifestError, ConfigError, EngineError ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, use_tools=not args.no_tools)
    if args.prompt is not None:
        stream_reply(engine, loaded.tokenizer, [{"role": "user", "content": args.prompt}], sys.stdout, **sampling)
        return 0
    print(f"flaxchat: {args.model} (step {loaded.step})")
    chat_loop(engine, loaded.tokenizer, input, sys.stdout, **sampling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
