"""Checkpoints on Orbax: save/resume a training run, with every step's files checked before it is restored.

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

How the train state maps onto these items is `checkpoint_tree`; loading a model for inference and weights-only
exports are `load`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from nanochat_jax.core.common import UserError, get_base_dir, print0, process_index
from nanochat_jax.train.checkpoint_tree import (abstract_state, config_dict, flatten_rest, join_state, jsonable,
                                                params_target, split_state)

TOKENIZER_DIR = "tokenizer"
FORMAT = "nanochat_jax/1"
MANIFEST = "SHA256SUMS.json"   # in each step directory: {relative file path: sha256}, written once it is on disk


def checkpoint_dir(stage: str, tag: str) -> Path:
    """`<base dir>/checkpoints/<stage>/<tag>`: where a run of `stage` named `tag` (e.g. 'd20') keeps checkpoints."""
    return get_base_dir() / "checkpoints" / stage / tag


def orbax_checkpoint():
    """The orbax.checkpoint module, imported on first use (import cost: it pulls in tensorstore, which code that
    only names checkpoint paths, such as `checkpoint_dir`, does not need)."""
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
        ocp = orbax_checkpoint()
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
        ocp = orbax_checkpoint()
        step = int(step)
        self._settle()
        if step in self._mngr.all_steps():
            return False
        params, rest = split_state(state)
        bad = _non_finite(params, rest)
        if bad:
            good = self.verified_steps()
            raise UserError(f"step {step}: the train state holds non-finite values ({bad}); not saving it"
                            + (f" (checkpoints of steps {good} are intact)" if good else ""))
        flat, _, paths = flatten_rest(rest)
        meta = dict(meta or {})
        meta.setdefault("step", step)
        meta["format"] = FORMAT
        meta["train_state_leaves"] = paths
        if self.tokenizer is not None:
            meta.setdefault("tokenizer_fingerprint", self.tokenizer.fingerprint())
            self._write_tokenizer()
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(jsonable(meta)),
                 "loader": ocp.args.JsonSave(jsonable(loader_state if loader_state is not None else {}))}
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
        return [s for s in sorted(self._mngr.all_steps()) if is_complete_step(self.directory / str(s))]

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
        ocp = orbax_checkpoint()
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
        ocp = orbax_checkpoint()
        self._settle()
        step = self._verified_step(step, fallback)
        target = abstract_state(target_state)
        params_t, rest_t = split_state(target)
        flat_t, treedef, paths = flatten_rest(rest_t)
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
        return join_state(rest, r.params), loader_state, meta

    def restore_params(self, step: int | None = None, shardings=None):
        """(params, meta) of `step` (default newest) without the optimizer state.

        shardings: None (all on the first local device), one Sharding for every leaf, or a pytree of them.
        """
        ocp = orbax_checkpoint()
        self._settle()
        step = self._verified_step(step, fallback=False)
        md = self._mngr.item_metadata(step)["params"]
        target = params_target(getattr(md, "tree", md), shardings)
        r = self._mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target),
                                                             meta=ocp.args.JsonRestore()))
        return r.params, dict(r.meta)


# ---------------------------------------------------------------------------------------------------------------
# Integrity: no non-finite state is saved; every finished step is sealed with its files' hashes

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


def is_complete_step(step_dir: Path) -> bool:
    """A step directory Orbax finished: it holds `_CHECKPOINT_METADATA`."""
    return step_dir.name.isdigit() and (step_dir / "_CHECKPOINT_METADATA").is_file()


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
        steps = sorted(int(p.name) for p in directory.iterdir() if is_complete_step(p))
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
    want = config_dict(config)
    if want is not None and meta.get("model_config") not in (None, want):
        diff = sorted(k for k in set(want) | set(meta["model_config"])
                      if want.get(k) != meta["model_config"].get(k))
        raise UserError(f"{directory} holds a checkpoint of a different model (differs in: {', '.join(diff)}); "
                        f"choose another --output_dir or pass --overwrite")
    if not resume:
        raise UserError(f"{directory} already holds a checkpoint (step {step}); pass --resume to continue it "
                        f"or --overwrite to start over")
    return step

