"""Facts about scripts/chat_cli.py (and its alias scripts/chat.py), with a scripted fake engine."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest

import nanochat_jax.cli.chat_cli as chat_cli
from webfakes import FakeEngine, FakeTokenizer, last_user_text

GEN = dict(max_context=256, max_tokens=64, temperature=0.0, top_k=0)


def scripted(lines):
    it = iter(lines)

    def read(label):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_prompt_answers_once():
    out, engine = io.StringIO(), FakeEngine()
    chat_cli.chat_loop(engine, FakeTokenizer(), out=out, prompt="what is 2+2?", **GEN)
    assert out.getvalue() == "echo: what is 2+2?\n"
    assert len(engine.calls) == 1


class PieceWriter(io.StringIO):
    """Records each write, to see the reply arrive piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_interactive_loop_streams_keeps_history_and_clears():
    out, engine = PieceWriter(), FakeEngine()
    chat_cli.chat_loop(engine, FakeTokenizer(), read=scripted(["hi", "  ", "again", "clear", "fresh", "quit",
                                                               "never read"]), out=out, **GEN)
    text = out.getvalue()
    assert "Assistant: echo: hi\n" in text and "echo: again" in text and "(new conversation)" in text
    assert len(engine.calls) == 3  # blank line ignored, quit stops before "never read"
    tok = FakeTokenizer()
    second = tok.decode(engine.calls[1]["tokens"])
    assert "hi" in second and "echo: hi" in second  # the history was sent
    third = engine.calls[2]["tokens"]
    assert last_user_text(third) == "fresh" and "again" not in tok.decode(third)  # cleared
    assert "e" in out.writes and "c" in out.writes  # streamed one piece at a time


def test_exit_and_eof_leave_the_loop():
    for lines in (["exit"], []):
        engine = FakeEngine()
        chat_cli.chat_loop(engine, FakeTokenizer(), read=scripted(lines), out=io.StringIO(), **GEN)
        assert engine.calls == []


def test_long_conversations_keep_fitting_the_context():
    engine = FakeEngine()
    chat_cli.chat_loop(engine, FakeTokenizer(), read=scripted([f"message {i} " + "x" * 60 for i in range(10)]),
                       out=io.StringIO(), max_context=200, max_tokens=50, temperature=0.0, top_k=0)
    assert len(engine.calls) == 10
    for call in engine.calls:
        assert len(call["tokens"]) + call["max_tokens"] <= 200
    assert last_user_text(engine.calls[-1]["tokens"]).startswith("message 9")


def test_main_wires_flags(monkeypatch):
    engine = FakeEngine()
    seen = {}

    def fake_load(args):
        seen["args"] = args
        return {}, SimpleNamespace(sequence_len=128), FakeTokenizer(), {}

    monkeypatch.setattr(chat_cli, "load_chat_model", fake_load)
    monkeypatch.setattr(chat_cli, "make_engine", lambda params, config, tok, max_len: seen.update(max_len=max_len)
                        or engine)
    chat_cli.main(["--checkpoint", "somewhere", "-t", "0.3", "-k", "7", "-m", "20", "-p", "hello",
                   "--seed", "5"])
    assert seen["args"].checkpoint == "somewhere"
    call = engine.calls[0]
    assert (call["temperature"], call["top_k"], call["max_tokens"], call["seed"]) == (0.3, 7, 20, 5)
    assert seen["max_len"] == 128 + 20            # the context plus the whole reply, as nanochat's chat_cli
    chat_cli.main(["--source", "rl", "--model-tag", "d4", "--step", "3", "-p", "x"])
    assert (seen["args"].source, seen["args"].model_tag, seen["args"].step) == ("rl", "d4", 3)


def test_a_reply_runs_to_max_tokens_even_when_the_prompt_fills_the_context(monkeypatch):
    """nanochat's chat_cli lets the reply run its whole --max-tokens after a long conversation (its cache is
    prompt + max_tokens); ours did stop at sequence_len (240 of 256 tokens in such a case)."""
    engine = FakeEngine()
    monkeypatch.setattr(chat_cli, "load_chat_model",
                        lambda args: ({}, SimpleNamespace(sequence_len=128), FakeTokenizer(), {}))
    monkeypatch.setattr(chat_cli, "make_engine", lambda params, config, tok, max_len: engine)
    chat_cli.main(["--checkpoint", "x", "-m", "256", "-p", "y" * 120])
    call = engine.calls[0]
    assert call["max_tokens"] == 256 and len(call["tokens"]) > 100


@pytest.mark.parametrize("module", ["scripts.chat_cli", "scripts.chat"])
def test_bad_checkpoint_is_one_line_error(module, tmp_path, base_dir):
    r = subprocess.run([sys.executable, "-m", module, "--checkpoint", str(tmp_path / "missing"), "-p", "hi"],
                       capture_output=True, text=True, timeout=120, cwd=chat_cli.__file__.rsplit("/nanochat_jax/", 1)[0])
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_bad_flags_are_rejected():
    with pytest.raises(chat_cli.UserError):
        chat_cli.main(["-t", "3", "-p", "x"])
