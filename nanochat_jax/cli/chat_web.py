"""Serve a chat model over HTTP: the chat page, nanochat's SSE API and an OpenAI-compatible API.

    python -m scripts.chat_web                                   # newest SFT checkpoint, http://localhost:8000
    python -m scripts.chat_web --source rl --model-tag d20 --port 8080 -t 0.6 -k 50 -m 1024
    python -m scripts.chat_web --checkpoint out/sft/d4 --host 127.0.0.1 --num-workers 2

Tiny CPU example (after the miniature's SFT):  python -m scripts.chat_web --source sft --host 127.0.0.1

Endpoints: GET / (page), POST /chat/completions (SSE `data: {"token": ...}` ... `data: {"done": true}`),
POST /v1/chat/completions and /v1/completions (OpenAI: `stream` true/false), GET /v1/models, GET /health, GET /stats.
    curl -N localhost:8000/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Why is the sky blue?"}]}'

Concurrency: one engine per device (--num-workers, default: every local accelerator, or 1 on CPU), each serving
--slots requests at once, batched into one decode step (continuous batching; --slots 1 = one at a time, as nanochat's
worker pool); up to 4 more per slot wait for one, and beyond that a request is answered 503 (busy) at once.

Served by waitress (serve/server.py): --max-connections open connections at most, each closed after --timeout idle
seconds; behind a reverse proxy, bind 127.0.0.1 and pass --trusted-proxy with the proxy's address (README).
"""

from __future__ import annotations

import logging

from nanochat_jax.core.common import ArgumentParser, UserError, enable_compilation_cache, parse_args, print0, run_main
from nanochat_jax.serve.app import create_app
from nanochat_jax.serve.model_args import add_model_args, load_chat_model, model_label
from nanochat_jax.serve.pool import Worker
from nanochat_jax.serve.protocol import MAX_TOKENS_RANGE, TEMPERATURE_RANGE, TOP_K_RANGE, plan_generation
from nanochat_jax.serve.server import QUEUE_PER_SLOT, serve, threads_for


# ---------------------------------------------------------------------------------------------------------------
# Arguments

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0], doc=__doc__)
    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0: no top-k filtering)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default longest reply, in tokens")
    p.add_argument("-n", "--num-workers", type=int, default=None,
                   help="engines (one per device, round-robin); default: every local GPU/TPU, 1 on CPU")
    p.add_argument("--slots", type=int, default=8,
                   help="concurrent requests per engine, batched into one decode step (continuous batching); "
                        "1 = one request at a time per engine, others queue")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the engine before serving")
    p.add_argument("--max-connections", type=int, default=500,
                   help="most open connections; more wait in the listen queue until one closes")
    p.add_argument("--timeout", type=int, default=60,
                   help="seconds an idle or half-sent connection stays open before the server closes it")
    p.add_argument("--trusted-proxy", default=None,
                   help="address of a reverse proxy whose X-Forwarded-For/-Proto/-Host/-Port headers are trusted")
    return p


def check_args(args):
    """One clear line for a flag out of range."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"-p/--port must be in [0, 65535] (0: any free port), got {args.port}")
    if not TEMPERATURE_RANGE[0] <= args.temperature <= TEMPERATURE_RANGE[1]:
        raise UserError(f"-t/--temperature must be in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}]")
    if not TOP_K_RANGE[0] <= args.top_k <= TOP_K_RANGE[1]:
        raise UserError(f"-k/--top-k must be in [{TOP_K_RANGE[0]}, {TOP_K_RANGE[1]}]")
    if not MAX_TOKENS_RANGE[0] <= args.max_tokens <= MAX_TOKENS_RANGE[1]:
        raise UserError(f"-m/--max-tokens must be in [{MAX_TOKENS_RANGE[0]}, {MAX_TOKENS_RANGE[1]}]")
    if args.max_connections < 1 or args.timeout < 1:
        raise UserError("--max-connections and --timeout must be at least 1")


# ---------------------------------------------------------------------------------------------------------------
# Engines: one per device

class DeviceEngine:
    """An engine whose computations run on one device: params placed there, `jax.default_device` set around its
    work. slots > 1: requests are batched into one decode step by the engine's BatchScheduler (continuous
    batching, on its own thread); slots == 1: each stream runs alone (a plain Engine)."""

    def __init__(self, params, config, tokenizer, device, slots: int = 1):
        import jax
        from nanochat_jax.infer.engine import Engine
        from nanochat_jax.infer.scheduler import BatchScheduler
        self.device = device
        with jax.default_device(device):
            self.engine = Engine(jax.device_put(params, device), config, tokenizer, max_batch=max(slots, 1))
            self.scheduler = None
            if slots > 1:
                class _OnDevice(BatchScheduler):  # the scheduler's loop thread works on this device too
                    def _loop(inner):
                        with jax.default_device(device):
                            return BatchScheduler._loop(inner)
                self.scheduler = _OnDevice(self.engine, batch_size=slots)

    def stream(self, tokens, **kw):
        import jax
        if self.scheduler is not None:
            yield from self.scheduler.stream(tokens, **kw)
            return
        with jax.default_device(self.device):
            yield from self.engine.stream(tokens, **kw)

    def score(self, tokens, start=1, top=0):
        import jax
        with jax.default_device(self.device):
            return self.engine.score(tokens, start, top)

    def stats(self) -> dict:
        return self.scheduler.stats() if self.scheduler is not None else {}


def build_workers(params, config, tokenizer, num_workers: int | None, slots: int):
    import jax
    devices = jax.local_devices()
    if num_workers is None:
        num_workers = 1 if devices[0].platform == "cpu" else len(devices)
    if num_workers < 1 or slots < 1:
        raise UserError("--num-workers and --slots must be at least 1")
    workers = []
    for i in range(num_workers):
        device = devices[i % len(devices)]
        kind = f"continuous batching, {slots} rows" if slots > 1 else "one request at a time"
        print0(f"engine {i} on {device} ({kind})")
        workers.append(Worker(DeviceEngine(params, config, tokenizer, device, slots), id=i, device=str(device),
                              slots=slots))
    return workers


# ---------------------------------------------------------------------------------------------------------------
# Main

def main(argv=None):
    args = parse_args(build_parser(), "chat_web", argv)
    check_args(args)
    # each exchange (and each HTTP request) is logged; other libraries' INFO chatter (orbax) is not; waitress warns
    # when it reaches its connection limit or its queue grows
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("nanochat_jax.serve").setLevel(logging.INFO)
    enable_compilation_cache()

    params, config, tokenizer, meta = load_chat_model(args)
    name = model_label(args, meta)
    print0(f"model {name}: {config.n_layer} layers, context {config.sequence_len}, vocab {config.vocab_size}")
    workers = build_workers(params, config, tokenizer, args.num_workers, args.slots)

    if not args.no_warmup:
        # compile now rather than on the first users' requests: the decode step of both sampling kinds (plain, and
        # top-k filtered: the engine compiles each once) and the prefill of the shortest prompt bucket
        print0("warming up (compiling)...")
        for top_k in sorted({args.top_k, 0 if args.top_k else 50}):
            tokens, kw = plan_generation(tokenizer, [{"role": "user", "content": "Hi"}],
                                         max_context=config.sequence_len, max_tokens=2, temperature=1.0,
                                         top_k=top_k, seed=0)
            for w in workers:
                for _ in w.engine.stream(tokens, **kw):
                    pass

    slots = sum(w.slots for w in workers)
    queue = QUEUE_PER_SLOT * slots
    app = create_app(workers, tokenizer, max_context=config.sequence_len, temperature=args.temperature,
                     top_k=args.top_k, max_tokens=args.max_tokens, model_name=name, max_waiting=queue)
    try:  # a thread per generating request and per request waiting for a slot, and a few to spare
        server = serve(app, args.host, args.port, threads=threads_for(slots, queue),
                       connection_limit=args.max_connections, timeout=args.timeout, trusted_proxy=args.trusted_proxy)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    print0(f"serving {name} at http://{shown}:{server.port}/ with waitress (Ctrl+C stops)")
    server.serve_forever()  # Ctrl+C: it closes the connections, run_main says "interrupted"


if __name__ == "__main__":
    run_main(main)
