"""scripts/export.py with interop/torch_zip.py, interop/nanochat.py (export_nanochat) and interop/hf.py: the nanochat
files read back bit-exactly by our importer (always), by torch.load where torch is installed, and the Hugging Face
directory loaded by Transformers (its tokenizer where transformers is installed, its model where torch is too)."""

import json
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from chat_fixtures import tiny_tokenizer
from helpers import load_ref, ref_state_dict
from nanochat_jax import model
from nanochat_jax.core.common import UserError, run_main
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.interop import convert, torch_zip
from nanochat_jax.interop.nanochat import import_nanochat, read_tiktoken_pickle
from nanochat_jax.train.load import export_weights, load_model_from_path
from nanochat_jax.cli import export

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tom has 3 apples and buys 4 more."},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me add: "},
                                      {"type": "python", "text": "3+4"},
                                      {"type": "python_output", "text": "7"},
                                      {"type": "text", "text": " so he has 7.\n#### 7"}]},
    {"role": "user", "content": "And  with 5 more?\n"}]}
TEXTS = ["Tom has 3 apples and buys 4 more. 3+4=7 so he has 7.\n#### 7", "  spaces\tand\r\nlines\n\n\n",
         "Ünïcödé naïve café 日本語 😀😀", "it's 12345678 o'clock, WE'LL see", "apple=A\n- sky=B"]


def _model(name: str):
    """(params, config, tokenizer) from a nanochat fixture's weights, with a tokenizer of its vocab size."""
    arrays, meta = load_ref(name)
    params, config = convert.from_nanochat(ref_state_dict(arrays), meta["config"])
    return params, config, tiny_tokenizer(config.vocab_size), arrays


def _saved(tmp_path, name: str, stage: str = "sft"):
    """The fixture's model saved as one of our exports under <base>/checkpoints/<stage>/d2."""
    params, config, tok, arrays = _model(name)
    out = export_weights(tmp_path / "base" / "checkpoints" / stage / "d2", params, config, tok,
                         meta={"step": 7, "val_bpb": 0.5}, dtype=None)
    return out, params, config, tok, arrays


# ---------------------------------------------------------------------------------------------------------------
# torch's file format, written without torch

def test_torch_file_round_trip_and_alignment(tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not contiguous: written contiguous
               "b": (np.arange(5, dtype=np.float32) / 3).astype(ml_dtypes.bfloat16),
               "n": np.array([1, -2, 3], dtype=np.int64), "s": np.array(2.5, dtype=np.float32)}
    path = torch_zip.write_torch_file(tmp_path / "model_000001.pt", tensors)
    back = torch_zip.read_torch_state_dict(path)
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names[0] == "model_000001/data.pkl" and "model_000001/byteorder" in names
        for info in zf.infolist():  # every record's bytes start on a 64-byte boundary, as torch writes them
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0, info.filename
    with pytest.raises(UserError, match="cannot write"):
        torch_zip.write_torch_file(tmp_path / "x.pt", {"a": np.zeros(2, np.complex64)})


def test_torch_load_reads_what_we_write(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[interop]')")
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([1, 2], dtype=np.int64),
               "b": np.ones(3, dtype=ml_dtypes.bfloat16)}
    sd = torch.load(torch_zip.write_torch_file(tmp_path / "m.pt", tensors), weights_only=True)
    assert list(sd) == list(tensors) and sd["b"].dtype == torch.bfloat16
    np.testing.assert_array_equal(sd["w"].numpy(), tensors["w"])
    np.testing.assert_array_equal(sd["n"].numpy(), tensors["n"])
    t = torch.load(torch_zip.write_torch_file(tmp_path / "t.pt", np.arange(4, dtype=np.int32)), weights_only=True)
    assert t.dtype == torch.int32 and t.tolist() == [0, 1, 2, 3]
    mm = torch.load(tmp_path / "m.pt", weights_only=True, mmap=True)  # needs the 64-byte alignment
    np.testing.assert_array_equal(mm["w"].numpy(), tensors["w"])


# ---------------------------------------------------------------------------------------------------------------
# --format nanochat

@pytest.mark.parametrize("name", ["orig_d2", "head_d4_gqa"])
def test_nanochat_export_reads_back_bit_exactly(tmp_path, base_dir, name):
    src, params, config, tok, arrays = _saved(tmp_path, name)
    out = tmp_path / "nanochat"
    ckpt = export.main(["--checkpoint", str(src), "--format", "nanochat", "--out", str(out)])
    assert ckpt == out / "chatsft_checkpoints" / "d2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_000007.json", "model_000007.pt"]
    meta = json.loads((ckpt / "meta_000007.json").read_text())
    assert meta["model_config"] == config.nanochat_config() and meta["step"] == 7 and meta["val_bpb"] == 0.5
    assert read_tiktoken_pickle(out / "tokenizer" / "tokenizer.pkl").fingerprint() == tok.fingerprint()
    token_bytes = torch_zip.read_torch_file(out / "tokenizer" / "token_bytes.pt")
    assert token_bytes.dtype == np.int32 and token_bytes.tolist() == tok.token_bytes(config.recipe == "2025").tolist()
    sd = torch_zip.read_torch_state_dict(ckpt / "model_000007.pt")
    ref = ref_state_dict(arrays)
    assert set(sd) == set(ref)
    for k in ref:  # the nanochat fixture's own tensors come back, bit for bit
        np.testing.assert_array_equal(sd[k], ref[k])

    back = import_nanochat(ckpt, out_dir=tmp_path / "reimported")
    params2, config2, tok2, _ = load_model_from_path(back)
    assert config2 == config and tok2.fingerprint() == tok.fingerprint()
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params2), jax.tree.map(np.asarray, params))


def test_nanochat_export_of_an_unpadded_2025_vocab_keeps_the_logits(tmp_path, base_dir):
    tok = tiny_tokenizer(500)
    config = ModelConfig.from_depth(2, d_model=64, head_dim=32, vocab_size=500, max_seq_len=32, recipe="2025")
    params = model.init_params(config, jax.random.PRNGKey(0))
    params["lm_head"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), params["lm_head"].shape)
    src = export_weights(tmp_path / "base" / "checkpoints" / "base" / "d2", params, config, tok, dtype=None)
    ckpt = export.main(["--checkpoint", str(src), "--format", "nanochat", "--out", str(tmp_path / "nc")])
    assert ckpt.parent.name == "base_checkpoints"
    sd = torch_zip.read_torch_state_dict(ckpt / "model_000000.pt")
    assert sd["transformer.wte.weight"].shape == (500, 64) and sd["lm_head.weight"].shape == (500, 64)
    params2, config2, _, _ = load_model_from_path(import_nanochat(ckpt, out_dir=tmp_path / "re"))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 32), 0, 500)
    np.testing.assert_array_equal(model.forward(params2, tokens, config2), model.forward(params, tokens, config))
    assert torch_zip.read_torch_file(tmp_path / "nc" / "tokenizer" / "token_bytes.pt").shape == (500,)


def test_nanochat_export_refuses_what_nanochat_cannot_hold_and_existing_files(tmp_path, base_dir, capsys):
    tok = tiny_tokenizer(512)
    config = ModelConfig.from_depth(2, d_model=64, head_dim=32, vocab_size=512, max_seq_len=32, mlp="swiglu")
    params = model.init_params(config, jax.random.PRNGKey(0))
    src = export_weights(tmp_path / "base" / "checkpoints" / "sft" / "sw", params, config, tok, dtype=None)
    with pytest.raises(SystemExit) as e:
        run_main(export.main, ["--checkpoint", str(src), "--format", "nanochat", "--out", str(tmp_path / "nc")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "swiglu" in err and "\n" not in err and not (tmp_path / "nc").exists()

    src, *_ = _saved(tmp_path, "orig_d2", stage="base")
    args = ["--checkpoint", str(src), "--format", "nanochat", "--out", str(tmp_path / "nc2")]
    export.main(args)
    with pytest.raises(UserError, match="--overwrite"):
        export.main(args)
    export.main(args + ["--overwrite"])


def test_torch_load_reads_the_nanochat_export(tmp_path, base_dir):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[interop]')")
    src, params, config, tok, arrays = _saved(tmp_path, "head_d4_gqa")
    ckpt = export.main(["--checkpoint", str(src), "--format", "nanochat", "--out", str(tmp_path / "nc")])
    sd = torch.load(ckpt / "model_000007.pt", map_location="cpu", weights_only=True)
    for k, v in ref_state_dict(arrays).items():
        np.testing.assert_array_equal(sd[k].numpy(), v)
    token_bytes = torch.load(tmp_path / "nc" / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.tolist() == tok.token_bytes().tolist()


# ---------------------------------------------------------------------------------------------------------------
# --format hf

def _hf_export(tmp_path, base_dir):
    src, params, config, tok, arrays = _saved(tmp_path, "orig_d2")
    out = export.main(["--checkpoint", str(src), "--format", "hf", "--out", str(tmp_path / "hf")])
    return out, params, config, tok, arrays


def test_hf_export_writes_the_files_and_a_tokenizer_with_our_ids(tmp_path, base_dir):
    from tokenizers import Tokenizer as HFTokenizer
    out, params, config, tok, _ = _hf_export(tmp_path, base_dir)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and cfg["vocab_size"] == 512 and cfg["intermediate_size"] == 512
    hf_tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert hf_tok.encode(text).ids == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    from safetensors.numpy import load_file
    weights = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(weights["model.layers.1.mlp.fc1.weight"], np.asarray(params["blocks"]["1"]["mlp"]
                                                                                      ["c_fc"]).T)


def test_hf_export_refuses_the_2026_recipe_in_one_line(tmp_path, base_dir, capsys):
    src, *_ = _saved(tmp_path, "head_d4")
    with pytest.raises(SystemExit) as e:
        run_main(export.main, ["--checkpoint", str(src), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "value embeddings" in err and "--format nanochat" in err
    assert not (tmp_path / "hf").exists()


def test_transformers_config_and_tokenizer_agree(tmp_path, base_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    out, params, config, tok, _ = _hf_export(tmp_path, base_dir)
    ours = json.loads((out / "config.json").read_text())
    fields = set(vars(transformers.NanoChatConfig)["__annotations__"])  # NanoChatConfig's own fields
    assert set(ours) == fields | {"architectures", "model_type", "dtype"}
    loaded = transformers.AutoConfig.from_pretrained(out)
    assert type(loaded).__name__ == "NanoChatConfig"
    for k in fields:
        assert getattr(loaded, k) == ours[k], k

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    messages = CONVERSATION["messages"]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ids["input_ids"] == tok.render_for_completion(CONVERSATION)
    whole = messages[:3]
    ids = hf_tok.apply_chat_template(whole, tokenize=True, return_dict=True)
    assert ids["input_ids"] == tok.render_conversation({"messages": whole})[0]


def _round_rope_to_bf16(monkeypatch):
    """Make Transformers' NanoChat round its RoPE tables to bf16, as nanochat 2025 and our 2025 recipe do."""
    from transformers.models.nanochat import modeling_nanochat as m
    forward = m.NanoChatRotaryEmbedding.forward

    def rounded(self, x, position_ids):
        cos, sin = forward(self, x, position_ids)
        return cos.bfloat16().to(cos.dtype), sin.bfloat16().to(sin.dtype)
    monkeypatch.setattr(m.NanoChatRotaryEmbedding, "forward", rounded)


def test_transformers_model_gives_our_logits(tmp_path, base_dir, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[interop]')")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    out, params, config, tok, arrays = _hf_export(tmp_path, base_dir)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf_model).__name__ == "NanoChatForCausalLM" and hf_model.dtype == torch.float32
    assert not any(info.values()), info
    prompt = tok.render_for_completion(CONVERSATION)
    batches = [np.asarray(arrays["idx"]), np.asarray([prompt])]
    ours = [np.asarray(model.forward(params, jnp.asarray(ids), config)) for ids in batches]

    def theirs(ids):
        with torch.no_grad():
            return hf_model(torch.from_numpy(ids).long()).logits.numpy()

    # As shipped, Transformers computes the RoPE tables in fp32: the logits differ by our bf16 table rounding only.
    for ids, want in zip(batches, ours):
        assert np.abs(theirs(ids) - want).max() <= 1e-3
    _round_rope_to_bf16(monkeypatch)
    for ids, want in zip(batches, ours):
        assert np.abs(theirs(ids) - want).max() <= 1e-5
    np.testing.assert_allclose(theirs(batches[0]), arrays["logits"], rtol=0, atol=1e-5)  # and nanochat's own
