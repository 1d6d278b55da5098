"""What every module shares: the base dir, rank-0 printing, dtype and device choice, user errors, and flags.

Flags: every script builds its parser with `ArgumentParser` (each `--long-flag` is also accepted as `--long_flag`,
and the other way round) and parses with `parse_args(parser, section)`, which applies a TOML preset given by
`--config FILE` (the table named `section`, keys = that script's flags) before the command line.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import shutil
import sys
import tomllib
from pathlib import Path


# ---------------------------------------------------------------------------------------------------------------
# Errors a user can cause: printed as one line, never a traceback.

class UserError(Exception):
    """A mistake in the user's input (flags, files, data). Scripts print it as one line and exit with code 2."""


def run_main(main, argv=None):
    """Run a script's `main(argv)`, turning UserError into a one-line message and Ctrl+C into exit code 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------------------------
# Paths and printing

def get_base_dir() -> Path:
    """`$NANOCHAT_BASE_DIR`, or `~/.cache/nanochat_jax`; created on first use."""
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat_jax")
    base.mkdir(parents=True, exist_ok=True)
    return base


def process_index() -> int:
    """This process's rank among all hosts (0 when single-host), without forcing a JAX import."""
    if "jax" in sys.modules:
        import jax  # already imported: this only binds the name
        try:
            return jax.process_index()
        except Exception:  # backend not initialised yet
            pass
    return int(os.environ.get("JAX_PROCESS_ID", os.environ.get("RANK", "0")))


def clear_output_dir(path, overwrite: bool) -> Path:
    """`path` resolved, emptied (on process 0) if it holds files and `overwrite` allows it, else one UserError line.
    The caller creates it."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace it")
        if process_index() == 0:
            shutil.rmtree(out)
    return out


def print0(*args, **kwargs):
    """print() on process 0 only; every other process is quiet."""
    if process_index() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Devices and dtypes

def backend() -> str:
    """'gpu', 'tpu' or 'cpu': the platform of JAX's default devices."""
    import jax  # on call: importing common must not import JAX (fast CLI start-up; jax.distributed set-up comes first)
    return jax.default_backend()


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


@functools.cache
def compute_dtype():
    """Activation/matmul dtype: `$NANOCHAT_DTYPE` if set, else bf16 on GPU/TPU and fp32 on CPU.

    Master weights stay fp32 whatever this says; the model casts them to this dtype for its matmuls.
    """
    import jax.numpy as jnp  # on call: importing common must not import JAX (fast CLI start-up; jax.distributed set-up comes first)
    name = os.environ.get("NANOCHAT_DTYPE", "").strip().lower()
    if name:
        if name not in _DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={name!r} is not one of float32, bfloat16, float16")
        return jnp.dtype(_DTYPES[name])
    return jnp.dtype("float32") if backend() == "cpu" else jnp.dtype("bfloat16")


def enable_compilation_cache(path: str | os.PathLike | None = None):
    """Turn on JAX's persistent compilation cache (default: `<base dir>/jax_cache`), so reruns skip compiles."""
    import jax  # on call: importing common must not import JAX (fast CLI start-up; jax.distributed set-up comes first)
    path = Path(path or os.environ.get("NANOCHAT_JAX_CACHE") or get_base_dir() / "jax_cache")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---------------------------------------------------------------------------------------------------------------
# Flags: one helper so that `--max-seq-len` and `--max_seq_len` are the same flag everywhere.

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each flag once, as it was declared (the other spelling is accepted, not listed), with its default
    where the help text does not already say it; the description and the examples keep their line breaks."""

    def _format_action_invocation(self, action):
        declared = getattr(action, "declared_option_strings", None)
        if not declared:
            return super()._format_action_invocation(action)
        every = action.option_strings
        action.option_strings = declared
        try:
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = every

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or "%(default)" in text or default is None
                or default is False or default == "" or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def examples(doc: str | None) -> str | None:
    """The examples of a script's docstring, as the epilog of its --help: its indented `python -m ...` lines with
    their continuations, and its "Tiny CPU example ...:" lines; None when it has none."""
    lines, continued = [], False
    for line in (doc or "").splitlines():
        label = not line.startswith(" ") and "example" in line.lower() and (
            "python -m " in line or line.rstrip().endswith(":"))
        if continued or label or (line.startswith("    ") and "python -m " in line):
            lines.append(line if line.startswith(" ") else "    " + line)
            continued = line.rstrip().endswith("\\")
    return "examples:\n" + "\n".join(lines) if lines else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse, where every long option is accepted with dashes and with underscores. `doc` (the script's
    docstring) puts its example commands under --help."""

    def __init__(self, *args, doc: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if doc is not None:
            kwargs.setdefault("epilog", examples(doc))
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        names = list(names)
        # as declared, less a second spelling of a flag already there (shown once under --help)
        declared = [n for i, n in enumerate(names)
                    if n.replace("_", "-") not in {m.replace("_", "-") for m in names[:i]}]
        for name in declared:
            if name.startswith("--"):
                for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if alt not in names:
                        names.append(alt)
        action = super().add_argument(*names, **kwargs)
        action.declared_option_strings = declared
        return action

    def error(self, message):
        # argparse's own errors already are one line plus usage; keep its exit code 2
        super().error(message)


# The tables a preset may hold: one per script that reads presets (its parse_args section), and [speedrun] for
# run_speedrun.sh. Any other table is a typo, refused rather than silently ignored.
PRESET_TABLES = ("base_eval", "base_loss", "base_train", "bench_train_step", "chat_cli", "chat_eval", "chat_rl",
                 "chat_sft", "chat_web", "download_data", "export", "import_nanochat", "mid_train", "pretokenize",
                 "report", "speedrun", "speedrun_plan", "tok_eval", "tok_train")


def _check_tables(data: dict, p: Path, section: str):
    """One line for a top-level key that is not a known table (a misspelled [base_trian], a key outside a table)."""
    known = sorted(set(PRESET_TABLES) | {section})
    for name, value in data.items():
        if not isinstance(value, dict):
            raise UserError(f"preset {p}: '{name}' is outside any table; put it under its script's table "
                            f"(known tables: {', '.join(known)})")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise UserError(f"preset {p}: unknown table [{name}]{hint}; known tables: {', '.join(known)}")


REPO_ROOT = Path(__file__).resolve().parents[2]   # the checkout holding nanochat_jax/ and configs/


def load_preset(path: str | os.PathLike, section: str) -> dict:
    """The `[section]` table of a TOML preset, with keys normalised to argparse dests (dashes -> underscores).
    Every table of the file must be one of PRESET_TABLES (or `section`)."""
    p = Path(path)
    if not p.is_file():
        # `--config d20` is a short name for configs/d20.toml: in the current directory, else in the checkout's
        name = f"{p.stem if p.suffix == '.toml' else p.name}.toml"
        found = [d / name for d in (Path.cwd() / "configs", REPO_ROOT / "configs") if (d / name).is_file()]
        if not found:
            raise UserError(f"preset {path} not found (nor configs/{name} here or in {REPO_ROOT})")
        p = found[0]
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"preset {p}: not valid TOML ({e})") from None
    _check_tables(data, p, section)
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise UserError(f"preset {p}: [{section}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items()}


def parse_args(parser: argparse.ArgumentParser, section: str, argv=None) -> argparse.Namespace:
    """Parse `argv` with `parser`, after applying the `[section]` table of `--config FILE` as defaults."""
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default=None, help="TOML preset; its [%s] table sets defaults" % section)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        table = load_preset(pre.config, section)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(table) - known)
        if unknown:
            raise UserError(f"preset {pre.config} [{section}]: unknown keys {', '.join(unknown)}")
        parser.set_defaults(**table)
    return parser.parse_args(argv)
