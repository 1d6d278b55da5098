"""SFT: the loss counts only mask-1 tokens (equal to a hand computation), a fully masked micro-batch gives no NaN,
and bad custom data is refused with its line number before anything else happens."""

import json

import jax
import numpy as np
import pytest

from nanochat_jax.core.common import UserError
from tests.chat_fixtures import tiny_config, tiny_params, tiny_tokenizer

CONVS = [
    {"messages": [{"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "I'm nanochat-jax, a small chat model."}]},
    {"messages": [{"role": "user", "content": "How many r are in the word strawberry?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me check: "}, {"type": "python", "text": "'strawberry'.count('r')"},
                      {"type": "python_output", "text": "3"}, {"type": "text", "text": "#### 3"}]}]},
]


def _setup(T=64):
    from nanochat_jax import optim
    from nanochat_jax.core import sharding
    from nanochat_jax.train import step as train
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, seq_len=T)
    params = tiny_params(cfg)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt_cfg = optim.OptConfig.for_recipe("2025")
    tx = optim.build_optimizer(params, cfg, opt_cfg, 10, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, "dp")
    step = train.make_train_step(cfg, tx, mesh, shardings, donate=False)
    return tok, cfg, params, mesh, state, step


def _hand_loss(params, cfg, tok, convs, T):
    """Σ -log p(next token) over positions whose NEXT token has mask 1, / their count, in float64 numpy."""
    from nanochat_jax import model
    total, count = 0.0, 0
    for c in convs:
        ids, mask = tok.render_conversation(c)
        x = np.zeros((1, T), np.int32)
        x[0, :len(ids) - 1] = ids[:-1]
        logits = np.asarray(model.forward(params, x, cfg), np.float64)[0]
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                row = logits[t]
                lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += lse - row[ids[t + 1]]
                count += 1
    return total / count, count


def test_masked_loss_equals_hand_computation_on_two_conversations():
    from nanochat_jax.core import sharding
    from nanochat_jax.data.loader import sft_loader
    T = 64
    tok, cfg, params, mesh, state, step = _setup(T)
    loader = sft_loader(CONVS, tok, 2, T, packing="pad", shuffle=False, process_index=0, process_count=1)
    b = next(loader)
    loader.close()
    # the loader's targets: -1 exactly where the rendering mask is 0 (user turn, bos, tool output, padding)
    for r, c in enumerate(sorted(CONVS, key=lambda c: 0)):   # pad mode, no shuffle: rows in order
        ids, mask = tok.render_conversation(c)
        want = np.full(T, -1)
        want[:len(ids) - 1] = np.where(np.asarray(mask[1:]) > 0, ids[1:], -1)
        assert (b["targets"][r] == want).all()
    hand, count = _hand_loss(params, cfg, tok, CONVS, T)
    assert count == int((b["targets"] >= 0).sum()) and count > 10
    batch = sharding.put_batch({k: v[None] for k, v in b.items()}, mesh)
    _, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(hand, rel=1e-5)


def test_fully_masked_micro_batch_gives_no_nan():
    from nanochat_jax.core import sharding
    from nanochat_jax.data.loader import sft_loader
    T = 64
    tok, cfg, params, mesh, state, step = _setup(T)
    loader = sft_loader(CONVS, tok, 2, T, packing="pad", shuffle=False, process_index=0, process_count=1)
    b = next(loader)
    loader.close()
    masked = {"inputs": b["inputs"], "targets": np.full_like(b["targets"], -1)}
    # one micro-batch with tokens + one with none: the same loss as the first alone, finite grads and params
    two = sharding.put_batch({k: np.stack([b[k], masked[k]]) for k in ("inputs", "targets")}, mesh)
    one = sharding.put_batch({k: v[None] for k, v in b.items()}, mesh)
    s2, m2 = step(state, two)
    _, m1 = step(state, one)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert np.isfinite(float(m2["grad_norm"]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s2.params))
    # a step whose only micro-batch is fully masked: loss 0, no NaN anywhere
    s0, m0 = step(state, sharding.put_batch({k: v[None] for k, v in masked.items()}, mesh))
    assert float(m0["loss"]) == 0.0 and float(m0["grad_norm"]) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s0.params))


@pytest.mark.parametrize("line,err", [
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "line 2: message 1 needs"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "line 2: message 1 has role"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "line 2: message 2 has empty"),
])
def test_bad_custom_data_is_refused_with_line_number_before_training(base_dir, tmp_path, capsys, line, err):
    from nanochat_jax.cli import chat_sft
    good = json.dumps(CONVS[0])
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    with pytest.raises(UserError, match=err):
        # no checkpoint exists in base_dir: reaching the model would fail differently ("no mid checkpoints")
        chat_sft.main(["--data-path", str(path), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_custom_json_prompt_response_missing_field(base_dir, tmp_path):
    from nanochat_jax.cli import chat_sft
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c"}]))
    with pytest.raises(UserError, match="item 2: missing field 'response'"):
        chat_sft.main(["--data-path", str(path)])


def test_custom_data_validation_is_held_out_of_training(base_dir, tmp_path, monkeypatch):
    """With --data-path, the val loss is measured on conversations the model never trains on (10%, at most 500)."""
    from nanochat_jax.cli import chat_sft
    from nanochat_jax.stages import finetune as ft
    convs = [{"messages": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer {i}"}]} for i in range(50)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    seen = {}
    monkeypatch.setattr(ft, "load_start", lambda args: None)
    monkeypatch.setattr(ft, "train_on_conversations",
                        lambda args, stage, section, start, train_ds, val_ds, notes: seen.update(t=train_ds, v=val_ds))
    chat_sft.main(["--data-path", str(path)])
    train = [seen["t"][i]["messages"][0]["content"] for i in range(len(seen["t"]))]
    val = [seen["v"][i]["messages"][0]["content"] for i in range(len(seen["v"]))]
    assert len(val) == 5 and len(train) == 45 and not set(val) & set(train)
    assert sorted(train + val) == sorted(c["messages"][0]["content"] for c in convs)


def test_hold_out_sizes():
    from nanochat_jax.tasks import hold_out
    convs = [{"messages": [{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}]}
             for i in range(9)]
    train, val = hold_out(convs, "custom")
    assert len(train) == 9 and val is None                    # fewer than 10: nothing to spare
    train, val = hold_out(convs * 1000, "custom")
    assert len(val) == 500 and len(train) == 8500             # at most 500
