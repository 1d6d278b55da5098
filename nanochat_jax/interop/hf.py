"""Our model -> a Hugging Face Transformers directory for Transformers' own NanoChat model (`model_type: "nanochat"`).

`export_hf(out_dir, params, config, tokenizer)` writes, without torch or transformers:

    config.json             the fields of Transformers' NanoChatConfig
    model.safetensors       fp32 weights under NanoChatForCausalLM's names (the `safetensors` package)
    tokenizer.json          our BPE as a `tokenizers` byte-level BPE: the same split pattern, the vocabulary of our
                            ranks, merges derived from them as Transformers' tiktoken converter derives them, and
                            the 9 special tokens at our ids
    tokenizer_config.json   with a chat template that renders a conversation as `Tokenizer.render_conversation`
                            (and, with add_generation_prompt, `render_for_completion`) does
    generation_config.json  stop at <|assistant_end|> or <|bos|>; chat_cli's sampling defaults

Transformers' NanoChat is nanochat's 2025 GPT (ReLU² MLP, QK norm after RoPE, the embedding normed, softcap 15); the
2026 recipe's value embeddings, smear, backout and sliding windows and the SwiGLU MLP have no counterpart there,
so such a model is refused with one line (the nanochat format holds the 2026 recipe).

One difference stays: nanochat 2025, and our 2025 recipe after it, round the RoPE cos/sin tables to bf16 whatever
the compute dtype, while Transformers computes them in the activation dtype. Loaded in bf16 the tables agree; in
fp32 the logits differ by that rounding (up to 2e-4 on the d2 test model; identical tables give the same logits to
1e-6, tests/test_export.py).

Tokenization: plain text gives our ids. Text that spells a special token (e.g. "<|bos|>") becomes that special token
in Transformers, as in every Hugging Face chat tokenizer, where ours encodes it as ordinary text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanochat_jax.core.common import UserError, clear_output_dir, process_index
from nanochat_jax.core.config import ModelConfig
from nanochat_jax.data.tokenizer import Tokenizer
from nanochat_jax.interop.convert import to_nanochat
from nanochat_jax.model.ops import RMS_EPS, SOFTCAP

# nanochat state_dict name (per layer) -> NanoChatForCausalLM's
_LAYER_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CHAT_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 50, "max_new_tokens": 512}  # chat_cli's defaults

# The conversation as Tokenizer.render_conversation renders it: bos; a leading system message joined to the first
# user message with a blank line; user turns between <|user_start|>/<|user_end|>; assistant turns between
# <|assistant_start|>/<|assistant_end|>, their content a string or a list of text/python/python_output parts.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}"
    "{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def check_hf_expressible(config: ModelConfig):
    """UserError (one line) when Transformers' NanoChat model cannot hold `config`."""
    if config.recipe != "2025":
        raise UserError(f"the {config.recipe} recipe (value embeddings, smear, backout, sliding windows) has no "
                        "counterpart in Transformers' NanoChat model; use the nanochat format (--format nanochat)")
    if config.mlp != "relu2":
        raise UserError(f"the {config.mlp} MLP has no counterpart in Transformers' NanoChat model (ReLU² only)")


# ---------------------------------------------------------------------------------------------------------------
# Weights and config

def hf_state_dict(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> NanoChatForCausalLM's state_dict (numpy fp32, vocab rows cut to `vocab_size`)."""
    sd = to_nanochat(params, config)  # PyTorch layout, vocab rows already cut for the 2025 recipe
    out = {"model.embed_tokens.weight": sd.pop("transformer.wte.weight"), "lm_head.weight": sd.pop("lm_head.weight")}
    for i in range(config.n_layer):
        for ours, theirs in _LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = sd.pop(f"transformer.h.{i}.{ours}.weight")
    if sd:
        raise UserError(f"no Transformers name for {sorted(sd)[0]}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _stop_ids(tokenizer: Tokenizer) -> dict:
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": end}


def hf_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json: every field of Transformers' NanoChatConfig, with our model's values."""
    return {"architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "dtype": "float32",
            "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
            "intermediate_size": config.mlp_hidden, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
            "max_position_embeddings": config.sequence_len, "hidden_act": "relu2", "attention_dropout": 0.0,
            "rms_norm_eps": RMS_EPS, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
            "use_cache": True, "final_logit_softcapping": SOFTCAP, "attention_bias": False,
            "tie_word_embeddings": False, **_stop_ids(tokenizer)}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

def _byte_chars() -> list[str]:
    """GPT-2's table: byte -> the printable character that spells it in a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def hf_tokenizer(tokenizer: Tokenizer) -> HFTokenizer:
    """Our tokenizer as a `tokenizers` byte-level BPE with the same ids.

    tiktoken merges, inside each piece of the split pattern, the adjacent pair whose concatenation has the lowest
    rank; a BPE merge list reproduces that when it holds every split (a, b) of every token with a, b in the
    vocabulary, ordered by the token's rank (ties by the ranks of a, b), and when a piece that already is a token is
    taken whole (ignore_merges), as tiktoken does.
    """
    chars = _byte_chars()
    ranks = tokenizer.get_mergeable_ranks()

    def spell(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], spell(a), spell(b)))
    merges.sort()
    vocab = {spell(token): rank for token, rank in ranks.items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    names = tokenizer.get_special_tokens()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    got = [hf.token_to_id(name) for name in names]
    if got != [tokenizer.encode_special(name) for name in names]:
        raise UserError(f"special token ids {got} do not follow the vocabulary; cannot write tokenizer.json")
    return hf


def hf_tokenizer_config(config: ModelConfig) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "model_max_length": config.sequence_len,
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}


# ---------------------------------------------------------------------------------------------------------------
# The directory

def export_hf(out_dir, params, config: ModelConfig, tokenizer: Tokenizer, overwrite: bool = False) -> Path:
    """Write the Transformers directory (see the module docstring); a non-empty `out_dir` only with `overwrite`."""
    check_hf_expressible(config)
    out = clear_output_dir(out_dir, overwrite)
    if process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)

    def write_json(name, obj):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_json("config.json", hf_config(config, tokenizer))
    save_file(hf_state_dict(params, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copymode(out / "config.json", out / "model.safetensors")  # safetensors creates it owner-only (0600)
    write_json("generation_config.json", {**_stop_ids(tokenizer), **CHAT_SAMPLING})
    hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    write_json("tokenizer_config.json", hf_tokenizer_config(config))
    return out
