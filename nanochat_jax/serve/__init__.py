"""The chat server: a Flask app (serve/app.py) served by waitress (serve/server.py); what both APIs share, nanochat's
request and the prompt (serve/protocol.py); the OpenAI requests and responses (serve/openai_request.py,
serve/openai_response.py); running a request's choices on a pool of generation slots (serve/generate.py,
serve/pool.py); and the model flags the chat scripts share (serve/model_args.py).

Endpoints (served by `nanochat_jax/cli/chat_web.py`: python -m scripts.chat_web, nanochat-jax chat-web):
  GET  /                     the chat page (ui.html, one file, no build step)
  POST /chat/completions     nanochat's SSE stream: `data: {"token": "...", "gpu": 0}` ... `data: {"done": true}`
  POST /v1/chat/completions  OpenAI-compatible; `stream: true` -> chat.completion.chunk events ending in
                             `data: [DONE]`, `stream: false` -> one chat.completion JSON with usage
  POST /v1/completions       OpenAI's plain text completion (text_completion), for base models and scoring
  GET  /v1/models            the one model served
  GET  /health               liveness + how many slots are free
  GET  /stats                slot pool and request counters
Errors on every route: {"error": {"message", "type", "param", "code"}}, OpenAI's shape.
"""
