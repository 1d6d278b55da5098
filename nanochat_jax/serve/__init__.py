"""The chat server: a Flask app factory (serve/app.py), request validation, prompts and response shapes
(serve/protocol.py), a pool of generation slots (serve/pool.py), and the model flags the chat scripts share
(serve/model_args.py).

Endpoints (served by `scripts/chat_web.py`):
  GET  /                     the chat page (ui.html, one file, no build step)
  POST /chat/completions     nanochat's SSE stream: `data: {"token": "...", "gpu": 0}` ... `data: {"done": true}`
  POST /v1/chat/completions  OpenAI-compatible; `stream: true` -> chat.completion.chunk events ending in
                             `data: [DONE]`, `stream: false` -> one chat.completion JSON with usage
  GET  /v1/models            the one model served
  GET  /health               liveness + how many slots are free
  GET  /stats                slot pool and request counters
"""
