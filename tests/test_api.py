"""Facts about the Python API (nanochat_jax/__init__.py, Engine.chat/complete): a saved model is loaded by stage and
tag or by path and answers in three lines, and `import nanochat_jax` does not import JAX."""

import subprocess
import sys

import pytest

from chat_fixtures import tiny_config, tiny_params, tiny_tokenizer
from nanochat_jax.train.load import export_weights


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    config = tiny_config(tok)
    return tiny_params(config), config, tok


def test_import_is_free_of_jax():
    code = ("import sys, nanochat_jax; from nanochat_jax import load_model; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_load_by_stage_or_path_then_chat_in_three_lines(base_dir, tiny):
    params, config, tok = tiny
    out = export_weights(base_dir / "checkpoints" / "sft" / "d2", params, config, tok, meta={"step": 3}, dtype=None)

    from nanochat_jax import Engine, load_model
    params2, config2, tok2, meta = load_model("sft", model_tag="d2")
    reply = Engine(params2, config2, tok2).chat("Who are you?", max_tokens=8, temperature=0.0)

    assert isinstance(reply, str) and meta["step"] == 3 and config2 == config
    assert load_model(path=out)[3]["step"] == 3 and load_model("sft")[3]["step"] == 3
    # chat = the conversation fitted to the context, generated, the new tokens decoded
    engine = Engine(params2, config2, tok2)
    prompt = engine.fit_conversation({"messages": [{"role": "user", "content": "Who are you?"}]}, 8)
    ids = engine.generate(prompt, max_tokens=8, temperature=0.0)[0][0][len(prompt):]
    assert reply == tok2.decode(ids)
    assert engine.chat([{"role": "user", "content": "Who are you?"}], max_tokens=8, temperature=0.0) == reply
    # complete: plain text after <|bos|>, greedy
    prompt = tok2.encode("Tom has 3 apples", prepend=tok2.get_bos_token_id())
    ids = engine.generate(prompt, max_tokens=6, temperature=0.0)[0][0][len(prompt):]
    assert engine.complete("Tom has 3 apples", max_tokens=6) == tok2.decode(ids)


def test_load_model_wants_a_stage_or_a_path(base_dir):
    from nanochat_jax import load_model
    with pytest.raises(TypeError, match="stage"):
        load_model()
    with pytest.raises(TypeError, match="not both"):
        load_model("sft", path=base_dir)
    with pytest.raises(AttributeError):
        import nanochat_jax
        nanochat_jax.NoSuchThing  # noqa: B018
