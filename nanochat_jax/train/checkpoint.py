"""Checkpoints on Orbax: save/resume a training run, load a model for inference, export weights.

Layout. A run writes under `<base dir>/checkpoints/<stage>/<tag>/` (or `--output_dir`):

    <dir>/<step>/params/      the params pytree (StandardSave: sharded arrays, restorable onto any mesh)
    <dir>/<step>/train_state/ every other leaf of the train state (optimizer moments, step, ...) as a flat dict
    <dir>/<step>/loader/      the data loader's iterator state (JsonSave)
    <dir>/<step>/meta/        JSON meta: model_config, step, val_bpb, tokenizer fingerprint, loop state, ...
    <dir>/tokenizer/          the tokenizer's files, written once, so a checkpoint directory is self-contained

Orbax writes each step into a temporary directory and renames it when every item is on disk, so a save that was
interrupted (SIGKILL, power loss) is never listed as a step; `latest_step()` sees only complete checkpoints.
Saving is asynchronous: `save()` returns once the arrays are copied to host memory and the loop continues.

Integrity. Once a step is on disk, the manager seals it: `<step>/SHA256SUMS.json` records a content hash of every
file. Every restore checks the step against it first, so a flipped, truncated or zeroed file is one clear error
(which file, which step) instead of garbage weights; a resume falls back to the newest step that verifies. A state
holding NaN/inf is refused at save time, and older steps are deleted (beyond `max_to_keep`) only once a newer one
is sealed, so the last good state is never lost.

A weights-only export (`export_weights`) is one directory: `params/` (bf16 by default, no optimizer state),
`export.json` (meta + model_config) and `tokenizer/`.

`load_model_from_path(path)` accepts a run's directory (newest step), one step's directory, an
export, or a stage directory (newest tag); `load_model(source, model_tag, step)` finds the same under the base dir.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import io
import json
import pickle
import shutil
import signal
import threading
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax.core.common import UserError, get_base_dir, print0, process_index

STAGES = ("base", "mid", "sft", "rl")
EXPORT_META = "export.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "nanochat_jax/1"
MANIFEST = "SHA256SUMS.json"   # in each step directory: {relative file path: sha256}, written once it is on disk


def checkpoint_dir(stage: str, tag: str) -> Path:
    """`<base dir>/checkpoints/<stage>/<tag>`: where a run of `stage` named `tag` (e.g. 'd20') keeps checkpoints."""
    return get_base_dir() / "checkpoints" / stage / tag


# ---------------------------------------------------------------------------------------------------------------
# Train state <-> (params, flat dict of the other leaves)
# The params are saved as their own nested-dict item (so inference restores them alone); everything else in the
# train state (optax NamedTuples, the step counter, a loss scale) is flattened to {"00000": leaf, ...} in tree
# order, which Orbax stores without needing to know the container types. The caller's target state supplies the
# structure again on restore.

def _split_state(state):
    """state -> (params, rest) where rest is the state with params removed (a dict, NamedTuple or dataclass)."""
    if isinstance(state, dict):
        return state["params"], {k: v for k, v in state.items() if k != "params"}
    if hasattr(state, "_replace"):
        return state.params, state._replace(params=None)
    if hasattr(state, "replace"):  # flax.struct.dataclass
        return state.params, state.replace(params=None)
    if dataclasses.is_dataclass(state):
        return state.params, dataclasses.replace(state, params=None)
    raise TypeError(f"checkpoint: cannot split a train state of type {type(state).__name__} (needs .params)")


def _join_state(rest, params):
    if isinstance(rest, dict):
        return {**rest, "params": params}
    if hasattr(rest, "_replace"):
        return rest._replace(params=params)
    if hasattr(rest, "replace"):
        return rest.replace(params=params)
    return dataclasses.replace(rest, params=params)


def _flat(tree) -> tuple[dict, object, list[str]]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {f"{i:05d}": leaf for i, (_, leaf) in enumerate(leaves_with_path)}
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    return flat, treedef, paths


def _abstract(x, sharding=None):
    """A jax.ShapeDtypeStruct with a sharding, from an array, a ShapeDtypeStruct or a Python/numpy scalar."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None and sharding is not None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    a = np.asarray(x)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or _default_sharding())


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def abstract_state(state, sharding=None):
    """The restore target for `state`: every leaf as a ShapeDtypeStruct carrying its (current-mesh) sharding."""
    return jax.tree.map(lambda x: _abstract(x, sharding), state)


def _config_dict(config) -> dict:
    if config is None:
        return None
    if isinstance(config, dict):
        d = config
    elif hasattr(config, "to_dict"):
        d = config.to_dict()
    else:
        d = dataclasses.asdict(config)
    return json.loads(json.dumps(d))  # tuples -> lists, so it compares equal with what JSON gives back


def _jsonable(obj):
    """A JSON-clean copy: numpy/jax scalars -> Python numbers, arrays -> lists, tuples -> lists."""
    def default(x):
        if hasattr(x, "tolist"):
            return x.tolist()
        if dataclasses.is_dataclass(x):
            return dataclasses.asdict(x)
        raise TypeError(f"checkpoint meta: {type(x).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(obj, default=default))


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


# ---------------------------------------------------------------------------------------------------------------
# The manager of one run's checkpoints

class CheckpointManager:
    """The checkpoints of one run (one directory): async atomic saves, keep the last `max_to_keep`, restore.

        ckpt = CheckpointManager(out_dir, max_to_keep=3, tokenizer=tok)
        ckpt.save(step, state, loader.get_state(), {"model_config": config.to_dict(), ...})
        ...
        state, loader_state, meta = ckpt.restore(abstract_state(state))   # newest complete step
        ckpt.close()
    """

    def __init__(self, directory, max_to_keep: int | None = 3, async_save: bool = True, tokenizer=None):
        ocp = _ocp()
        self.directory = Path(directory).expanduser().resolve()
        self.tokenizer = tokenizer
        self.max_to_keep, self.async_save = max_to_keep, async_save
        self._saving: int | None = None   # the step whose async save may still be running
        # Orbax keeps everything; `_settle` prunes, and only after the newer step is sealed
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=async_save)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                    "loader": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving ---------------------------------------------------------------------------------------------------

    def save(self, step: int, state, loader_state=None, meta: dict | None = None, force: bool = False) -> bool:
        """Start saving `state` (a train state with `.params`, or a dict with "params") at `step`.

        Returns once the arrays are copied off the devices; the files are written in the background (`wait()`).
        Returns False if a checkpoint of this step already exists.
        """
        ocp = _ocp()
        step = int(step)
        self._settle()
        if step in self._mngr.all_steps():
            return False
        params, rest = _split_state(state)
        bad = _non_finite(params, rest)
        if bad:
            good = self.verified_steps()
            raise UserError(f"step {step}: the train state holds non-finite values ({bad}); not saving it"
                            + (f" (checkpoints of steps {good} are intact)" if good else ""))
        flat, _, paths = _flat(rest)
        meta = dict(meta or {})
        meta.setdefault("step", step)
        meta["format"] = FORMAT
        meta["train_state_leaves"] = paths
        if self.tokenizer is not None:
            meta.setdefault("tokenizer_fingerprint", self.tokenizer.fingerprint())
            self._write_tokenizer()
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(_jsonable(meta)),
                 "loader": ocp.args.JsonSave(_jsonable(loader_state if loader_state is not None else {}))}
        if flat:
            items["train_state"] = ocp.args.StandardSave(flat)
        self._saving = step
        try:
            saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
        except OSError as err:
            self._disk_error(step, err)
        if saved and not self.async_save:
            self._settle()
        return saved

    # -- integrity ------------------------------------------------------------------------------------------------

    def _settle(self):
        """Wait for this manager's running save, seal that step, then prune to max_to_keep. Only steps this
        manager wrote are sealed: a restore never writes into a checkpoint directory."""
        try:
            self._mngr.wait_until_finished()
        except OSError as err:
            self._disk_error(self._saving, err)
        step, self._saving = self._saving, None
        if step is None or process_index() != 0 or step not in self.all_steps():
            return
        _seal(self.directory / str(step))
        if self.max_to_keep:   # the newer step is on disk and sealed: only now may the oldest go
            for s in self.all_steps()[:-self.max_to_keep]:
                self._mngr.delete(s)

    def _disk_error(self, step, err: OSError):
        """A failed write: remove its temporary directories; a full disk is one line naming what is intact."""
        for p in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            good = [s for s in self.all_steps() if s != step]
            raise UserError(f"no space left on device while saving step {step}; "
                            + (f"steps {good} are intact" if good else "no earlier checkpoint exists")) from err
        raise err

    def verify(self, step: int) -> str | None:
        """None if step's files match their recorded hashes, else what is wrong, in a few words. A step written
        before checkpoints were sealed (no manifest) is taken as it is."""
        return _check_seal(self.directory / str(int(step)))

    def verified_steps(self) -> list[int]:
        return [s for s in self.all_steps() if self.verify(s) is None]

    def _verified_step(self, step: int | None, fallback: bool) -> int:
        """`step` (default: the newest) after checking its files; with `fallback`, the newest older step that
        verifies when it does not (saying which it skipped). UserError when none does."""
        step = self._step(step)
        problem = self.verify(step)
        if problem is None:
            return step
        if not fallback:
            raise UserError(f"checkpoint {self.directory}/{step} is damaged: {problem}")
        for older in reversed([s for s in self.all_steps() if s < step]):
            p = self.verify(older)
            if p is None:
                print0(f"checkpoint step {step} is damaged ({problem}); resuming from step {older}, the newest "
                       f"one that verifies")
                return older
        raise UserError(f"checkpoint {self.directory}/{step} is damaged ({problem}) and no older step verifies")

    def _write_tokenizer(self):
        d = self.directory / TOKENIZER_DIR
        if process_index() != 0 or d.exists():
            return
        tmp = self.directory / (TOKENIZER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.tokenizer.save(tmp)
        tmp.rename(d)

    def wait(self):
        """Block until every started save is on disk and sealed (call before exiting)."""
        self._settle()

    def close(self):
        self._settle()
        self._mngr.close()

    # -- listing --------------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints: Orbax lists only renamed (finished) step directories; a bare step
        directory without Orbax's metadata file (not one Orbax finished) is skipped as well."""
        return [s for s in sorted(self._mngr.all_steps()) if _is_complete(self.directory / str(s))]

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (an interrupted save is never listed), or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- restoring ------------------------------------------------------------------------------------------------

    def _step(self, step):
        if step is None:
            step = self.latest_step()
            if step is None:
                raise UserError(f"no checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise UserError(f"no checkpoint of step {step} in {self.directory} (have: {self.all_steps()})")
        return int(step)

    def read_meta(self, step: int | None = None) -> dict:
        ocp = _ocp()
        step = self._step(step)
        return dict(self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def _stored_shapes(self, step: int) -> dict[str, tuple]:
        """The shapes of the train-state arrays saved at `step`, from Orbax's own metadata ({} where it has none)."""
        try:
            tree = self._mngr.item_metadata(step)["train_state"].tree
            return {k: tuple(v.shape) for k, v in tree.items()}
        except (KeyError, AttributeError, TypeError, ValueError, FileNotFoundError):
            return {}

    def restore(self, target_state, step: int | None = None, fallback: bool = False):
        """Restore (state, loader_state, meta) of `step` (default: the newest) onto `target_state`'s shardings.

        target_state: the state's structure with jax.ShapeDtypeStructs carrying shardings on the *current* mesh
        (or concrete arrays, whose shardings are used) - see `abstract_state`. The saved mesh does not matter.
        The step's files are checked against their hashes first; fallback=True (a resume) goes back to the newest
        older step that verifies, and meta["step"] tells which one was restored.
        """
        ocp = _ocp()
        self._settle()
        step = self._verified_step(step, fallback)
        target = abstract_state(target_state)
        params_t, rest_t = _split_state(target)
        flat_t, treedef, paths = _flat(rest_t)
        meta = self.read_meta(step)
        saved = meta.get("train_state_leaves")
        if saved is not None and saved != paths:
            raise UserError(f"checkpoint {self.directory}/{step} holds a different train state layout "
                            f"({len(saved)} leaves, expected {len(paths)}): optimizer or config changed?")
        stored = self._stored_shapes(step) if flat_t else {}
        for (key, x), path in zip(flat_t.items(), paths):
            if key in stored and stored[key] != tuple(x.shape):
                raise UserError(f"checkpoint {self.directory}/{step} holds {path} of shape {stored[key]}, this code "
                                f"wants {tuple(x.shape)}: written by another version, optimizer or config")
        items = {"params": ocp.args.StandardRestore(params_t), "loader": ocp.args.JsonRestore()}
        if flat_t:
            items["train_state"] = ocp.args.StandardRestore(flat_t)
        r = self._mngr.restore(step, args=ocp.args.Composite(**items))
        rest = jax.tree_util.tree_unflatten(treedef, [r.train_state[k] for k in sorted(flat_t)]) if flat_t else rest_t
        loader_state = r.loader if r.loader else None
        return _join_state(rest, r.params), loader_state, meta

    def restore_params(self, step: int | None = None, shardings=None):
        """(params, meta) of `step` (default newest) without the optimizer state.

        shardings: None (all on the first local device), one Sharding for every leaf, or a pytree of them.
        """
        ocp = _ocp()
        self._settle()
        step = self._verified_step(step, fallback=False)
        md = self._mngr.item_metadata(step)["params"]
        target = _params_target(getattr(md, "tree", md), shardings)
        r = self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
        return r.params, dict(r.meta)


def _params_target(metadata_tree, shardings):
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        s = shardings or _default_sharding()
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), metadata_tree,
                            is_leaf=is_leaf)
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), metadata_tree,
                        shardings, is_leaf=is_leaf)


def _non_finite(*trees) -> str | None:
    """A few words on the first float leaf holding NaN/inf, or None when every one is finite."""
    for tree in trees:
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and not bool(jnp.isfinite(x).all()):
                return f"{jax.tree_util.keystr(path)} is not finite"
    return None


def _file_hashes(step_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and not p.name.startswith(MANIFEST):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[str(p.relative_to(step_dir))] = h.hexdigest()
    return out


def _seal(step_dir: Path):
    """Record the hash of every file of a finished step (atomically: a manifest is whole or absent)."""
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_file_hashes(step_dir), indent=1) + "\n")
    tmp.rename(step_dir / MANIFEST)


def _check_seal(step_dir: Path) -> str | None:
    manifest = step_dir / MANIFEST
    if not manifest.is_file():
        return None
    try:
        want = json.loads(manifest.read_text())
    except ValueError:
        return f"its {MANIFEST} is unreadable"
    have = _file_hashes(step_dir)
    for name, digest in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != digest:
            return f"{name} does not match its recorded hash (changed or truncated on disk)"
    extra = sorted(set(have) - set(want))
    return f"{extra[0]} was not part of it" if extra else None


def _is_complete(step_dir: Path) -> bool:
    return step_dir.name.isdigit() and (step_dir / "_CHECKPOINT_METADATA").is_file()


def _is_run_dir(path: Path) -> bool:
    """A directory holding Orbax step directories (complete ones: they hold `_CHECKPOINT_METADATA`)."""
    return path.is_dir() and any(_is_complete(p) for p in path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Starting a run: refuse to clobber, resume when asked

def check_output_dir(directory, resume: bool, overwrite: bool, config=None) -> int | None:
    """Decide what a run does with its output directory before it writes anything. Returns the step to resume.

    - no checkpoint there: start fresh (None); `--resume` -> UserError.
    - a checkpoint there: `--resume` continues from its newest step (UserError if it holds a different model
      config); `--overwrite` deletes its checkpoints and starts fresh; neither -> UserError.
    Call it after the other inputs are validated: `--overwrite` deletes.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    directory = Path(directory).expanduser()
    step = None
    if directory.is_dir():
        steps = sorted(int(p.name) for p in directory.iterdir() if _is_complete(p))
        step = steps[-1] if steps else None
    if step is None:
        if resume:
            raise UserError(f"--resume: no checkpoint in {directory}")
        return None
    if overwrite:
        if process_index() == 0:
            for p in directory.iterdir():
                if p.name.isdigit() or ".orbax-checkpoint-tmp" in p.name or p.name == TOKENIZER_DIR:
                    shutil.rmtree(p)
        print0(f"--overwrite: removed the checkpoints in {directory}")
        return None
    mngr = CheckpointManager(directory, max_to_keep=None, async_save=False)
    # the config check reads the newest meta that reads (the files are checked, once, by the restore that follows)
    meta = {}
    for s in reversed(mngr.all_steps()):
        try:
            meta = mngr.read_meta(s)
            break
        except Exception:  # a damaged step, whatever Orbax's JSON reader raises: the restore reports it
            continue
    want = _config_dict(config)
    if want is not None and meta.get("model_config") not in (None, want):
        diff = sorted(k for k in set(want) | set(meta["model_config"])
                      if want.get(k) != meta["model_config"].get(k))
        raise UserError(f"{directory} holds a checkpoint of a different model (differs in: {', '.join(diff)}); "
                        f"choose another --output_dir or pass --overwrite")
    if not resume:
        raise UserError(f"{directory} already holds a checkpoint (step {step}); pass --resume to continue it "
                        f"or --overwrite to start over")
    return step


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM / Ctrl+C: finish the step, save, exit

class StopRequest:
    """Turns SIGTERM and SIGINT into a flag the loop polls, so that it saves a final checkpoint and exits.

        stop = StopRequest().install()
        for step in ...:
            ...
            if stop.requested: ckpt.save(step, state, ..., force=True); break
        stop.uninstall()

    A second Ctrl+C raises KeyboardInterrupt at once.
    """

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then exiting "
               f"(Ctrl+C again to abort now)")

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self):
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


# ---------------------------------------------------------------------------------------------------------------
# Weights-only export

def export_weights(out_dir, params, config, tokenizer=None, meta: dict | None = None, dtype="bfloat16",
                   overwrite: bool = False) -> Path:
    """Write params (cast to `dtype`; None keeps them), model config, meta and tokenizer files to `out_dir`."""
    ocp = _ocp()
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace it")
        if process_index() == 0:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        dt = jnp.dtype(dtype)
        params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params)
        ckptr.wait_until_finished()
    info = dict(meta or {})
    info.update(format=FORMAT, kind="export", model_config=_config_dict(config),
                dtype=str(jnp.dtype(dtype)) if dtype is not None else "as saved")
    if tokenizer is not None:
        info["tokenizer_fingerprint"] = tokenizer.fingerprint()
    if process_index() == 0:
        if tokenizer is not None:
            tokenizer.save(out / TOKENIZER_DIR)
        (out / EXPORT_META).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def _load_export(path: Path, shardings=None):
    ocp = _ocp()
    meta = json.loads((path / EXPORT_META).read_text(encoding="utf-8"))
    with ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(path / "params")
        md = getattr(md, "item_metadata", md)
        target = _params_target(getattr(md, "tree", md), shardings)
        params = ckptr.restore(path / "params", target)
    return params, meta


# ---------------------------------------------------------------------------------------------------------------
# Loading a model for inference

def _load_tokenizer(run_dir: Path, meta: dict):
    """The tokenizer saved beside the checkpoints, else the base dir's (checked against the fingerprint)."""
    from nanochat_jax.data import tokenizer as tok_mod
    d = run_dir / TOKENIZER_DIR
    tok = tok_mod.Tokenizer.from_directory(d) if d.is_dir() else tok_mod.get_tokenizer()
    want = meta.get("tokenizer_fingerprint")
    if want and tok.fingerprint() != want:
        raise UserError(f"the tokenizer at {d if d.is_dir() else 'the base dir'} is not the one this model was "
                        f"trained with (fingerprint {tok.fingerprint()} != {want})")
    return tok


def _make_config(meta: dict):
    from nanochat_jax.core.config import ModelConfig
    if not meta.get("model_config"):
        raise UserError("checkpoint meta has no model_config")
    return ModelConfig.from_dict(meta["model_config"])


def _newest_subdir(path: Path) -> Path | None:
    """The most recently written tag directory under a stage directory."""
    cands = [p for p in path.iterdir() if p.is_dir() and (_is_run_dir(p) or (p / EXPORT_META).is_file())]
    if not cands:
        return None
    return max(cands, key=lambda p: max((q.stat().st_mtime for q in p.iterdir()), default=p.stat().st_mtime))


def resolve_checkpoint(path, step: int | None = None) -> tuple[str, Path, int | None]:
    """What `--checkpoint PATH` names: ('export', dir, None) or ('run', run dir, step)."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if (p / EXPORT_META).is_file():
        return "export", p, None
    if _is_complete(p):
        if step is not None and int(step) != int(p.name):
            raise UserError(f"--step {step} contradicts the step directory {p}")
        return "run", p.parent, int(p.name)
    if _is_run_dir(p):
        return "run", p, step
    if p.is_dir():
        sub = _newest_subdir(p)
        if sub is not None:
            return resolve_checkpoint(sub, step)
    raise UserError(f"{path} is neither a checkpoint directory, a step directory, nor an export")


def load_model_from_path(path, step: int | None = None, shardings=None, dtype=jnp.float32):
    """(params, config, tokenizer, meta) from a run dir (newest step, or `step`), a step dir, or an export.

    Params come back on the first local device (or `shardings`) and, unless dtype=None, cast to `dtype`
    (float32: master-weight precision, which the model casts to the compute dtype itself).
    """
    kind, d, step = resolve_checkpoint(path, step)
    if kind == "export":
        params, meta = _load_export(d, shardings)
    else:
        mngr = CheckpointManager(d, max_to_keep=None, async_save=False)
        params, meta = mngr.restore_params(step, shardings)
        mngr.close()
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return params, _make_config(meta), _load_tokenizer(d, meta), meta


def load_model_from_args(args, **kwargs):
    """(params, config, tokenizer, meta) for the model the flags name: `--checkpoint PATH` (with `--step`), else
    `--source` / `--model-tag` / `--step` under the base dir."""
    if getattr(args, "checkpoint", None):
        return load_model_from_path(args.checkpoint, step=args.step, **kwargs)
    return load_model(args.source, args.model_tag, args.step, **kwargs)


def load_model(source: str, model_tag: str | None = None, step: int | None = None, **kwargs):
    """(params, config, tokenizer, meta) of stage `source` (base|mid|sft|rl) under the base dir.

    model_tag None picks the most recently written tag; step None the newest step.
    """
    if source not in STAGES:
        raise UserError(f"--source must be one of {', '.join(STAGES)}, got {source!r}")
    stage_dir = get_base_dir() / "checkpoints" / source
    if model_tag is None:
        sub = _newest_subdir(stage_dir) if stage_dir.is_dir() else None
        if sub is None:
            raise UserError(f"no {source} checkpoints under {stage_dir}; train one first")
        path = sub
    else:
        path = stage_dir / model_tag
        if not path.exists():
            have = sorted(p.name for p in stage_dir.iterdir()) if stage_dir.is_dir() else []
            raise UserError(f"no {source} checkpoint tagged {model_tag!r} (have: {', '.join(have) or 'none'})")
    return load_model_from_path(path, step=step, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# nanochat checkpoints, read without torch
# A torch .pt file is a zip: <archive>/data.pkl (the pickled state_dict) and <archive>/data/<key> (raw storage
# bytes). The pickle is read by a restricted unpickler that admits only the tensor-rebuild functions, storage types
# and OrderedDict; any other class in the file is refused. The tokenizer pickle (a tiktoken Encoding) likewise:
# only the Encoding's plain-data state is accepted, and our Tokenizer is rebuilt from its ranks.

def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        dt = _STORAGE_DTYPES[name]
        self.dtype = np.dtype(_bf16() if dt == "bfloat16" else dt)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[storage_offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * item for s in stride))
    return np.array(view)  # copy: contiguous, owning its memory


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _TorchUnpickler(pickle.Unpickler):
    _ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._zf, self._prefix = zf, prefix

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint (not tensor data)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        data = self._zf.read(f"{self._prefix}data/{key}")
        return np.frombuffer(data, dtype=stype.dtype, count=numel)


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """A torch-saved (zip format) state_dict as {name: numpy array}, without torch. bf16 arrives as ml_dtypes."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a torch zip checkpoint (legacy torch.save format is not supported)") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise UserError(f"{path} holds no data.pkl: not a torch checkpoint")
        prefix = pkl[0][:-len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
            raise UserError(f"{path} was saved big-endian; not supported")
        try:
            obj = _TorchUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
        except pickle.UnpicklingError as e:
            raise UserError(f"{path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items()}


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps its plain-data state, builds nothing."""

    def __setstate__(self, state):
        self.state = state


class _TiktokenUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a tokenizer pickle")


def read_tiktoken_pickle(path):
    """nanochat's tokenizer.pkl (a pickled tiktoken Encoding) -> our Tokenizer, through a restricted unpickler."""
    from nanochat_jax.data.tokenizer import Tokenizer
    path = Path(path)
    try:
        obj = _TiktokenUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path}: not a tiktoken tokenizer pickle ({e})") from None
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise UserError(f"{path} names the registered tiktoken encoding {state!r}, not one with its own ranks")
    ok = (isinstance(state, dict) and isinstance(state.get("pat_str"), str)
          and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict)
          and all(isinstance(k, bytes) and isinstance(v, int) for k, v in state["mergeable_ranks"].items())
          and all(isinstance(k, str) and isinstance(v, int) for k, v in state["special_tokens"].items()))
    if not ok:
        raise UserError(f"{path}: unexpected tokenizer state (expected tiktoken Encoding data)")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    names = sorted(specials, key=specials.get)
    if [specials[n] for n in names] != list(range(len(ranks), len(ranks) + len(names))):
        raise UserError(f"{path}: special token ids do not follow the mergeable ranks; cannot convert")
    return Tokenizer(ranks, state["pat_str"], names)


_NANOCHAT_STAGES = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
                    "chatrl_checkpoints": "rl"}


def _find_nanochat_tokenizer(ckpt_dir: Path) -> Path | None:
    for cand in (ckpt_dir / "tokenizer.pkl", ckpt_dir / "tokenizer" / "tokenizer.pkl",
                 ckpt_dir.parent / "tokenizer" / "tokenizer.pkl", ckpt_dir.parent.parent / "tokenizer" / "tokenizer.pkl"):
        if cand.is_file():
            return cand
    return None


def import_nanochat(src_dir, out_dir=None, step: int | None = None, stage: str | None = None,
                    model_tag: str | None = None, tokenizer_path=None, dtype: str | None = None,
                    overwrite: bool = False) -> Path:
    """nanochat checkpoint dir (model_XXXXXX.pt, meta_XXXXXX.json, a tokenizer.pkl nearby) -> our export.

    Default destination: `<base dir>/checkpoints/<stage>/<tag>`, the stage from nanochat's directory name
    (base_checkpoints -> base, chatsft_checkpoints -> sft, ...), the tag from the directory's own name.
    dtype None keeps float32 (bit-exact with the source); "bfloat16" halves the size.
    """
    from nanochat_jax.interop.convert import from_nanochat
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise UserError(f"{src_dir} is not a directory")
    steps = sorted(int(p.stem.split("_")[1]) for p in src.glob("model_*.pt") if p.stem.split("_")[1].isdigit())
    if not steps:
        raise UserError(f"{src} holds no model_XXXXXX.pt")
    step = steps[-1] if step is None else int(step)
    model_pt, meta_json = src / f"model_{step:06d}.pt", src / f"meta_{step:06d}.json"
    if not model_pt.is_file():
        raise UserError(f"{src} has no step {step} (have: {', '.join(map(str, steps))})")
    if not meta_json.is_file():
        raise UserError(f"{meta_json} is missing: the model config comes from it")
    nano_meta = json.loads(meta_json.read_text(encoding="utf-8"))
    tok_path = Path(tokenizer_path) if tokenizer_path else _find_nanochat_tokenizer(src)
    if tok_path is None or not tok_path.is_file():
        raise UserError(f"no tokenizer.pkl found near {src}; pass --tokenizer PATH")
    tokenizer = read_tiktoken_pickle(tok_path)
    state_dict = read_torch_state_dict(model_pt)
    params, config = from_nanochat(state_dict, nano_meta["model_config"])
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model {config.vocab_size}")
    if out_dir is None:
        stage = stage or _NANOCHAT_STAGES.get(src.parent.name, "base")
        out_dir = checkpoint_dir(stage, model_tag or src.name)
    meta = {"step": step, "source": "nanochat", "source_dir": str(src), "nanochat_meta": nano_meta}
    if "val_bpb" in nano_meta:
        meta["val_bpb"] = nano_meta["val_bpb"]
    return export_weights(out_dir, params, config, tokenizer, meta=meta, dtype=dtype, overwrite=overwrite)
