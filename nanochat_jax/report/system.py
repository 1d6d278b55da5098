"""The machine and the code a run used, for the report's header: git commit, hardware (GPUs from nvidia-smi, CPU,
memory), software versions, an hourly cost estimate and the size of the source."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

# $/hour per GPU by model name, as nanochat's report estimates it (Lambda on-demand prices, 2025)
GPU_HOURLY = {"H200": 3.50, "H100": 3.00, "A100": 1.79, "L40": 1.10, "A10": 0.75, "V100": 0.55}
GPU_HOURLY_DEFAULT = 2.00
CODE_EXTENSIONS = (".py", ".rs", ".sh", ".html", ".toml")


def _run(cmd: list[str], cwd=None) -> str:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def repo_root() -> Path:
    """The repository's root (this file is nanochat_jax/report/system.py)."""
    return Path(__file__).resolve().parents[2]


def git_info(root=None) -> dict:
    root = root or repo_root()
    commit = _run(["git", "rev-parse", "--short", "HEAD"], root)
    if not commit:
        return {"commit": "unknown (not a git checkout)"}
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], root))
    return {"commit": commit + (" (uncommitted changes)" if dirty else ""),
            "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], root),
            "message": _run(["git", "log", "-1", "--pretty=%s"], root)[:100]}


def gpu_info() -> list[dict]:
    """[{name, memory_gib}] per NVIDIA GPU from nvidia-smi (no JAX import: reporting must not grab the devices)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0]:
            try:
                gpus.append({"name": parts[0], "memory_gib": round(float(parts[1]) / 1024, 1)})
            except ValueError:
                gpus.append({"name": parts[0], "memory_gib": None})
    return gpus


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def hardware_info() -> dict:
    gpus = gpu_info()
    info = {"platform": f"{platform.system()} {platform.machine()}", "cpu": _cpu_name(),
            "cpu cores": os.cpu_count(), "memory (GiB)": _memory_gib()}
    if gpus:
        names = sorted({g["name"] for g in gpus})
        info["gpus"] = f"{len(gpus)} x " + ", ".join(names) + (f" ({gpus[0]['memory_gib']} GiB each)"
                                                               if gpus[0]["memory_gib"] else "")
    else:
        info["gpus"] = "none (CPU)"
    return info


def software_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def hourly_cost(gpus: list[dict] | None = None) -> float:
    """Estimated $/hour of this machine: GPUs priced per GPU by model; a CPU-only machine counts as free."""
    gpus = gpu_info() if gpus is None else gpus
    total = 0.0
    for g in gpus:
        total += next((v for k, v in GPU_HOURLY.items() if k in g["name"]), GPU_HOURLY_DEFAULT)
    return total


def code_size(root=None) -> dict:
    """Characters, lines and files of the source (tracked .py/.rs/.sh/.html/.toml files), nanochat's 'bloat'."""
    root = Path(root or repo_root())
    listed = _run(["git", "ls-files"], root).splitlines()
    if listed:
        files = [root / f for f in listed]
    else:
        files = [p for p in root.rglob("*") if ".venv" not in p.parts and "target" not in p.parts]
    files = [p for p in files if p.suffix in CODE_EXTENSIONS and p.is_file()]
    chars = lines = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += text.count("\n")
    return {"characters": chars, "lines": lines, "files": len(files)}
