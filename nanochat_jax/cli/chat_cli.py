"""Chat with a model in the terminal, the reply streaming as it is generated.

    python -m scripts.chat_cli                                  # newest SFT checkpoint, interactive
    python -m scripts.chat_cli --source rl --model-tag d20 -t 0.6 -k 50
    python -m scripts.chat --checkpoint out/sft/d4 -p "Why is the sky blue?"   # answer once and exit

Tiny CPU example (after the miniature's SFT):  python -m scripts.chat_cli --source sft -p "Hello"

In the loop: type a message and Enter; `clear` starts a new conversation; `quit` or `exit` (or Ctrl+D) leaves.
A conversation longer than the model's context keeps its newest turns.
"""

from __future__ import annotations

import sys

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, run_main
from nanochat_jax.serve.model_args import add_model_args, load_chat_model
from nanochat_jax.serve.protocol import plan_generation, stop_token_ids


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], doc=__doc__)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k (0: no top-k filtering)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per reply)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The conversation loop (importable: tests drive it with a fake engine and scripted input)

def stream_reply(engine, tokenizer, messages, out, *, max_context, max_tokens, temperature, top_k, seed=None) -> str:
    """Generate the assistant's reply to `messages`, writing each piece to `out` as it comes; returns the reply."""
    tokens, kw = plan_generation(tokenizer, messages, max_context=max_context, max_tokens=max_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed)
    stop, pieces = stop_token_ids(tokenizer), []
    for token_id, piece in engine.stream(tokens, **kw):
        if token_id in stop:
            break
        if piece:
            pieces.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces)


def chat_loop(engine, tokenizer, *, read=input, out=sys.stdout, prompt=None, **gen_kw):
    """Interactive chat (or one answer when `prompt` is given). `read(label)` returns the next line of input."""
    if prompt is not None:
        if not prompt.strip():
            raise UserError("-p/--prompt is empty")
        stream_reply(engine, tokenizer, [{"role": "user", "content": prompt}], out, **gen_kw)
        return
    out.write("nanochat: type a message; 'clear' starts over, 'quit' or 'exit' leaves.\n")
    messages = []
    while True:
        try:
            line = read("\nUser: ")
        except EOFError:
            out.write("\n")
            return
        text = line.strip()
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            messages = []
            out.write("(new conversation)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        out.write("\nAssistant: ")
        out.flush()
        reply = stream_reply(engine, tokenizer, messages, out, **gen_kw)
        if reply:
            messages.append({"role": "assistant", "content": reply})
        else:
            messages.pop()  # an empty reply cannot be a turn; the user may ask again


# ---------------------------------------------------------------------------------------------------------------
# Main

def make_engine(params, config, tokenizer, max_len):
    from nanochat_jax.infer.engine import Engine
    return Engine(params, config, tokenizer, max_len=max_len)


def main(argv=None):
    args = parse_args(build_parser(), "chat_cli", argv)
    if not 0.0 <= args.temperature <= 2.0 or not 0 <= args.top_k <= 200 or args.max_tokens < 1:
        raise UserError("need 0 <= -t <= 2, 0 <= -k <= 200 and -m >= 1")
    enable_compilation_cache()
    params, config, tokenizer, meta = load_chat_model(args)
    # As nanochat's chat_cli: the conversation keeps up to sequence_len tokens and the reply may run its whole
    # --max-tokens beyond it (the cache holds both; attention past sequence_len is the recipe's own)
    max_context = config.sequence_len + args.max_tokens
    engine = make_engine(params, config, tokenizer, max_context)
    chat_loop(engine, tokenizer, prompt=args.prompt, max_context=max_context, max_tokens=args.max_tokens,
              temperature=args.temperature, top_k=args.top_k, seed=args.seed)


if __name__ == "__main__":
    run_main(main)
