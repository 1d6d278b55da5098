"""The model's shape, derived from one dial (`--depth`), and the scaling rules that go with it.

`ModelConfig` is a frozen dataclass (hashable, so it can be a jit static argument). `ModelConfig.from_depth(d)`
follows nanochat: width = 64*d rounded up to a multiple of head_dim (128), heads = width/head_dim, kv heads = heads,
MLP 4*width. Two architecture recipes:
  2025: the original nanochat (ReLU², RoPE base 10,000 with bf16 rotary tables, no extras, vocab 65,536);
  2026: value embeddings, residual/x0 scalars, sliding windows "SSSL", smear, backout, RoPE base 100,000,
        q/k scale 1.2, vocab 32,768 (the default recipe).
The scaling rules (training horizon, total batch size, LR and weight-decay scales) are plain functions below, and
`describe()` prints all of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from nanochat_jax.core.common import UserError

RECIPES = ("2025", "2026")
MLPS = ("relu2", "swiglu")
VOCAB_PAD = 64            # wte/lm_head rows padded to a multiple of 64 for the matmul; logits are sliced back
VE_GATE_CHANNELS = 12     # value-embedding gate reads the first 12 channels of the attention input (nanochat head)
SMEAR_CHANNELS = 24       # smear gate reads the first 24 channels of the embedding (nanochat head)
FULL_CONTEXT = 2 ** 31 - 1  # a window that never binds: plain causal attention over any length (the 2025 recipe)
B_REF = 2 ** 19           # nanochat: optimal total batch at d12 ~= 524,288 tokens (measured by nanochat)
BATCH_POWER = 0.383       # nanochat 2026: B_opt ∝ D^0.383 (Power Lines, arXiv:2505.13738)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 20
    n_embd: int = 1280
    n_head: int = 10
    n_kv_head: int = 10
    head_dim: int = 128
    vocab_size: int = 32768          # the tokenizer's vocab; params hold `padded_vocab_size` rows
    sequence_len: int = 2048
    mlp: str = "relu2"
    recipe: str = "2026"
    window_pattern: str = "SSSL"     # 2026 only: tiled over layers, last layer always long (L)
    rope_base: int = 0               # 0 = the recipe's (10,000 for 2025, 100,000 for 2026)

    def __post_init__(self):
        recipe = str(self.recipe)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "window_pattern", str(self.window_pattern).upper())
        if not self.rope_base:
            object.__setattr__(self, "rope_base", 10000 if recipe == "2025" else 100000)
        self.validate()

    # -----------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "ModelConfig":
        """nanochat's sizing from `depth`. Overrides (None = derive): d_model, n_heads, n_kv_heads, head_dim,
        max_seq_len, vocab_size, mlp, recipe, window_pattern, aspect_ratio, rope_base."""
        o = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(o) - {"d_model", "n_heads", "n_kv_heads", "head_dim", "max_seq_len", "vocab_size", "mlp",
                            "recipe", "window_pattern", "aspect_ratio", "rope_base"}
        if unknown:
            raise TypeError(f"from_depth: unknown overrides {sorted(unknown)}")
        if not isinstance(depth, int) or depth < 1:
            raise UserError(f"depth must be a positive integer, got {depth}")
        recipe = str(o.get("recipe", "2026"))
        if recipe not in RECIPES:
            raise UserError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        head_dim = o.get("head_dim", 128)
        if "d_model" in o:
            width = o["d_model"]
        else:  # nudge up to a multiple of head_dim, as nanochat does, so head_dim stays exact
            base = depth * o.get("aspect_ratio", 64)
            width = -(-base // head_dim) * head_dim
        if "n_heads" in o:
            n_head = o["n_heads"]
            if "head_dim" not in o:
                if n_head < 1 or width % n_head:
                    raise UserError(f"width {width} is not divisible by {n_head} heads")
                head_dim = width // n_head
        else:
            if head_dim < 1 or width % head_dim:
                raise UserError(f"width {width} is not divisible by head dim {head_dim}")
            n_head = width // head_dim
        vocab = o.get("vocab_size", 65536 if recipe == "2025" else 32768)
        return cls(n_layer=depth, n_embd=width, n_head=n_head, n_kv_head=o.get("n_kv_heads", n_head),
                   head_dim=head_dim, vocab_size=vocab, sequence_len=o.get("max_seq_len", 2048),
                   mlp=o.get("mlp", "relu2"), recipe=recipe, window_pattern=o.get("window_pattern", "SSSL"),
                   rope_base=o.get("rope_base", 0))

    def validate(self):
        """Raise UserError (one line) for a config that cannot build a model."""
        def need(ok, msg):
            if not ok:
                raise UserError(msg)
        need(self.recipe in RECIPES, f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        need(self.mlp in MLPS, f"mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        need(self.n_layer >= 1, f"depth (n_layer) must be >= 1, got {self.n_layer}")
        need(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head dim must be even and >= 2, got {self.head_dim}")
        need(self.n_embd >= 1 and self.n_embd % self.head_dim == 0,
             f"width {self.n_embd} is not divisible by head dim {self.head_dim}")
        need(self.n_head * self.head_dim == self.n_embd,
             f"n_head {self.n_head} x head_dim {self.head_dim} != width {self.n_embd}")
        need(1 <= self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0,
             f"heads ({self.n_head}) not divisible by kv heads ({self.n_kv_head})")
        need(self.vocab_size >= 2, f"vocab size must be >= 2, got {self.vocab_size}")
        need(self.sequence_len >= 1, f"max seq len must be >= 1, got {self.sequence_len}")
        need(self.rope_base > 1, f"rope base must be > 1, got {self.rope_base}")
        if self.recipe == "2026":
            need(self.window_pattern != "" and set(self.window_pattern) <= {"S", "L"},
                 f"window pattern must use only S and L, got {self.window_pattern!r}")
            need(self.n_embd >= SMEAR_CHANNELS, f"the 2026 recipe needs width >= {SMEAR_CHANNELS}, got {self.n_embd}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # -----------------------------------------------------------------------------------------------------------
    # Derived shapes

    @property
    def depth(self) -> int:
        return self.n_layer

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    @property
    def mlp_hidden(self) -> int:
        """4*width for ReLU²; for SwiGLU (3 matrices) 8/3*width rounded up to 64, the same parameter count."""
        if self.mlp == "relu2":
            return 4 * self.n_embd
        return -(-(8 * self.n_embd // 3) // 64) * 64

    @property
    def short_window(self) -> int:
        """nanochat head: S = ceil(seq_len/4/128)*128 (512 at T=2048)."""
        return -(-self.sequence_len // 4 // 128) * 128

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Left window per layer: query i sees keys i-w..i. 2025: every layer attends to the whole causal context,
        however long (nanochat 2025 used plain causal SDPA: rows past sequence_len, as in CORE, see everything);
        2026: long layers get w = sequence_len, as nanochat's (long_window, 0)."""
        if self.recipe == "2025":
            return (FULL_CONTEXT,) * self.n_layer
        sizes = [self.short_window if self.window_pattern[i % len(self.window_pattern)] == "S" else self.sequence_len
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return tuple(sizes)

    def has_ve(self, layer: int) -> bool:
        """2026: value embeddings on alternate layers, the last one always included."""
        return self.recipe == "2026" and layer % 2 == (self.n_layer - 1) % 2

    @property
    def ve_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if self.has_ve(i))

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    @property
    def qk_scale(self) -> float:
        return 1.2 if self.recipe == "2026" else 1.0

    def nanochat_config(self) -> dict:
        """The `model_config` dict nanochat stores in its checkpoint meta."""
        d = dict(sequence_len=self.sequence_len, vocab_size=self.vocab_size, n_layer=self.n_layer,
                 n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd)
        if self.recipe == "2026":
            d["window_pattern"] = self.window_pattern
        return d


# ---------------------------------------------------------------------------------------------------------------
# Command-line flags

def add_model_args(parser, depth: int = 20):
    """Add the model flags to a script's parser (a `common.ArgumentParser`, so each flag also takes underscores)."""
    g = parser  # not an argument group: common.ArgumentParser adds the dash/underscore aliases in its add_argument
    g.add_argument("--depth", type=int, default=depth, help="number of layers; everything else derives from it")
    g.add_argument("--recipe", choices=RECIPES, default="2026", help="architecture recipe")
    g.add_argument("--d-model", type=int, default=None, help="width (default 64*depth rounded up to head dim)")
    g.add_argument("--n-heads", type=int, default=None, help="query heads (default width/head_dim)")
    g.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads (default = heads; GQA if fewer)")
    g.add_argument("--head-dim", type=int, default=None, help="head dimension (default 128)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    g.add_argument("--vocab-size", type=int, default=None, help="vocab size (default: the tokenizer's)")
    g.add_argument("--mlp", choices=MLPS, default="relu2", help="MLP activation (nanochat measured SwiGLU worse)")
    g.add_argument("--window-pattern", type=str, default="SSSL", help="2026: sliding windows, S=short L=long")
    return parser


def config_from_args(args, vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from parsed `add_model_args` flags; `vocab_size` (the tokenizer's) applies unless a flag set it."""
    vocab = getattr(args, "vocab_size", None) or vocab_size
    return ModelConfig.from_depth(args.depth, d_model=args.d_model, n_heads=args.n_heads,
                                  n_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                                  max_seq_len=args.max_seq_len, vocab_size=vocab, mlp=args.mlp,
                                  recipe=args.recipe, window_pattern=args.window_pattern)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and FLOPs (nanochat's formulas; no model is built)

def num_params(config: ModelConfig) -> dict:
    """Parameter counts by group, like nanochat's num_scaling_params, plus 'total'."""
    c, L, V = config.n_embd, config.n_layer, config.padded_vocab_size
    kv = config.n_kv_head * config.head_dim
    attn = c * c + 2 * c * kv + c * c
    mlp = (3 if config.mlp == "swiglu" else 2) * c * config.mlp_hidden
    ve_layers = config.ve_layers
    out = {
        "wte": V * c,
        "value_embeds": len(ve_layers) * V * kv,
        "lm_head": c * V,
        "transformer_matrices": L * (attn + mlp) + len(ve_layers) * VE_GATE_CHANNELS * config.n_kv_head,
        "scalars": (2 * L + 2 + SMEAR_CHANNELS) if config.recipe == "2026" else 0,
    }
    out["total"] = sum(out.values())
    return out


def flops_per_token(config: ModelConfig) -> int:
    """Training FLOPs per token (fwd+bwd): 6 x matmul params + 12·heads·head_dim·(attended length) per layer.

    2025: 6*(params - wte) + 12*L*H*D*T. 2026: value embeddings and scalars are lookups, not matmuls, so they are
    excluded, and each layer's attention counts min(window, T) keys (nanochat's estimate_flops).
    """
    p = num_params(config)
    matmul = p["total"] - p["wte"] - p["value_embeds"] - p["scalars"]
    h, d, t = config.n_head, config.head_dim, config.sequence_len
    attn = sum(12 * h * d * min(w, t) for w in config.window_sizes)
    return 6 * matmul + attn


# ---------------------------------------------------------------------------------------------------------------
# Scaling rules (nanochat's base_train)

def default_param_data_ratio(config: ModelConfig) -> float:
    """Tokens per parameter: Chinchilla's 20 for the 2025 recipe, nanochat's 10.5 for 2026."""
    return 20.0 if config.recipe == "2025" else 10.5


def scaling_params(config: ModelConfig) -> int:
    """The parameter count the horizon scales with: all params (2025); block matrices + lm_head (2026, the
    cleanest scaling laws per nanochat's dev log)."""
    p = num_params(config)
    return p["total"] if config.recipe == "2025" else p["transformer_matrices"] + p["lm_head"]


def target_tokens(config: ModelConfig, param_data_ratio: float | None = None) -> int:
    ratio = default_param_data_ratio(config) if param_data_ratio is None else param_data_ratio
    return int(ratio * scaling_params(config))


def reference_config(config: ModelConfig) -> ModelConfig:
    """nanochat's d12 reference model (where hyperparameters were tuned), with this config's other settings."""
    return ModelConfig.from_depth(12, head_dim=config.head_dim, max_seq_len=config.sequence_len,
                                  vocab_size=config.vocab_size, mlp=config.mlp, recipe=config.recipe,
                                  window_pattern=config.window_pattern)


def total_batch_size(config: ModelConfig, param_data_ratio: float | None = None) -> int:
    """Tokens per optimizer step: 524,288 for 2025; for 2026 B_REF·(D/D_ref)^0.383, rounded to a power of 2."""
    if config.recipe == "2025":
        return B_REF
    d_ref = target_tokens(reference_config(config), param_data_ratio)
    predicted = B_REF * (target_tokens(config, param_data_ratio) / d_ref) ** BATCH_POWER
    return 2 ** round(math.log2(predicted))


def num_iterations(config: ModelConfig, batch_size: int, num_steps: int = -1, target_flops: float = -1.0,
                   param_data_ratio: float | None = None) -> int:
    """Horizon in optimizer steps, by precedence: explicit steps, a FLOP budget, or a tokens:params ratio."""
    if num_steps > 0:
        return num_steps
    if target_flops > 0:
        return max(1, round(target_flops / (flops_per_token(config) * batch_size)))
    return max(1, target_tokens(config, param_data_ratio) // batch_size)


def dmodel_lr_scale(config: ModelConfig) -> float:
    """AdamW LRs were tuned at width 768: scale by (width/768)^-0.5."""
    return (config.n_embd / 768) ** -0.5


def batch_lr_scale(batch_size: int) -> float:
    """η ∝ √(B/B_ref) (nanochat 2026; 1.0 at 524,288)."""
    return (batch_size / B_REF) ** 0.5


def weight_decay_scale(config: ModelConfig, batch_size: int, param_data_ratio: float | None = None) -> float:
    """λ = λ_ref·√(B/B_ref)·(D_ref/D): keeps T_epoch = B/(η·λ·D) constant (arXiv:2405.13698, nanochat 2026)."""
    d_ref = target_tokens(reference_config(config), param_data_ratio)
    return math.sqrt(batch_size / B_REF) * d_ref / target_tokens(config, param_data_ratio)


def describe(config: ModelConfig, batch_size: int | None = None, num_steps: int = -1, target_flops: float = -1.0,
             param_data_ratio: float | None = None) -> str:
    """Everything derived from the config, one line each, for the start-up banner."""
    p = num_params(config)
    bs = batch_size or total_batch_size(config, param_data_ratio)
    steps = num_iterations(config, bs, num_steps, target_flops, param_data_ratio)
    fpt = flops_per_token(config)
    lines = [
        f"recipe {config.recipe} | depth {config.n_layer} | width {config.n_embd} | heads {config.n_head} "
        f"(kv {config.n_kv_head}) x {config.head_dim} | mlp {config.mlp} {config.mlp_hidden}",
        f"vocab {config.vocab_size:,} (padded {config.padded_vocab_size:,}) | context {config.sequence_len} | "
        f"rope base {config.rope_base:,}",
    ]
    if config.recipe == "2026":
        lines.append(f"windows {list(config.window_sizes)} | value-embed layers {list(config.ve_layers)} | "
                     f"backout after layer {config.backout_layer}")
    lines += [f"params {k}: {v:,}" for k, v in p.items()]
    lines += [
        f"FLOPs per token: {fpt:e}",
        f"scaling params: {scaling_params(config):,} | tokens:params target "
        f"{param_data_ratio or default_param_data_ratio(config)}",
        f"total batch size: {bs:,} tokens | steps: {steps:,} | tokens: {bs * steps:,} | "
        f"training FLOPs: {fpt * bs * steps:e}",
        f"LR scales: AdamW dmodel {dmodel_lr_scale(config):.6f}, batch {batch_lr_scale(bs):.6f} | "
        f"weight-decay scale {weight_decay_scale(config, bs, param_data_ratio):.6f}",
    ]
    return "\n".join(lines)
