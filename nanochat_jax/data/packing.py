"""Packing documents into rows of T + 1 tokens: the packers behind the loaders (plain Python, host side).

`BestFitPacker`: nanochat's BOS-aligned best fit (pretraining crops to fill each row; SFT pads instead).
`RowPacker`: pulls (doc id, epoch) chunks from its parent and yields rows {"inputs", "targets", "epoch"} in one of
four modes: "bestfit" (pretraining, nanochat 2026), "concat" (documents back to back, rows cut anywhere),
"sft_pack" (best fit of whole conversations) and "sft_pad" (one conversation per row). `PackSpec` is what it needs
and `DocLookup` turns a doc id into tokens; both pickle to grain workers.
Packer state = the parent's position + the ids in its buffer/current chunk, so a resumed loader rebuilds the exact
buffer by re-reading those documents.
"""

from __future__ import annotations

import bisect

import numpy as np

REFILL_DOCS = 128   # best-fit packing tops its buffer up in nanochat's tokenizer batches of 128 documents


# ---------------------------------------------------------------------------------------------------------------
# Packers (plain Python, host side). A "doc" is (tokens: int array, mask: int array | None).

class BestFitPacker:
    """Rows of `capacity` tokens (T + 1), nanochat's BOS-aligned best fit.

    The buffer holds at least `buffer_size` documents (pretraining tops it up before every pick, in nanochat's
    batches of REFILL_DOCS; SFT before every row). Each row takes the largest document that still fits, again and again;
    when none fits: `crop=True` (pretraining) crops the shortest buffered document to fill the row exactly (the rest
    of it is dropped and counted in `cropped`); `crop=False` (SFT) pads the row instead (targets -1). `one_per_row`
    puts exactly one document in each row (SFT "pad" mode). Ties between equal lengths go to the older document.
    """

    def __init__(self, capacity: int, buffer_size: int, bos: int | None, crop: bool = True,
                 one_per_row: bool = False, pad_id: int = 0):
        self.capacity, self.buffer_size, self.bos = capacity, buffer_size, bos
        self.crop, self.one_per_row, self.pad_id = crop, one_per_row, pad_id
        self.keys: list[tuple[int, int]] = []    # sorted (length incl. bos, seq)
        self.items: dict[int, tuple] = {}        # seq -> (doc_id, epoch, tokens, mask)
        self.seq = 0
        self.cropped = 0                         # tokens dropped by cropping
        self.packed = 0                          # tokens placed into rows

    def __len__(self):
        return len(self.keys)

    def add(self, doc_id: int, epoch: int, tokens: np.ndarray, mask: np.ndarray | None = None):
        n = len(tokens) + (self.bos is not None)
        self.items[self.seq] = (doc_id, epoch, tokens, mask)
        bisect.insort(self.keys, (n, self.seq))
        self.seq += 1

    def buffered(self) -> list[list[int]]:
        """[[doc_id, epoch], ...] in arrival order: with the source, enough to rebuild the buffer."""
        return [[int(self.items[s][0]), int(self.items[s][1])] for s in sorted(self.items)]

    def _place(self, row, mask_row, pos, k, n_take) -> tuple[int, int]:
        n, s = self.keys.pop(k)
        doc_id, epoch, tokens, mask = self.items.pop(s)
        take = min(n, n_take)
        if self.bos is not None:
            row[pos] = self.bos
            row[pos + 1:pos + take] = tokens[:take - 1]
            mask_row[pos] = 1      # pretraining: predicting the next document's bos is trained on, as nanochat
            mask_row[pos + 1:pos + take] = 1 if mask is None else mask[:take - 1]
        else:
            row[pos:pos + take] = tokens[:take]
            mask_row[pos:pos + take] = 1 if mask is None else mask[:take]
        self.cropped += n - take
        self.packed += take
        return pos + take, epoch

    def pop_row(self, refill=None) -> tuple[np.ndarray, np.ndarray, int]:
        """One row: (tokens int32[capacity], mask int8[capacity] (0 = no loss on this position), max epoch).
        refill(): called before each document is picked (tops the buffer up, as nanochat does)."""
        cap = self.capacity
        row = np.full(cap, self.pad_id, dtype=np.int32)
        mask_row = np.zeros(cap, dtype=np.int8)
        pos, epoch = 0, 0
        while pos < cap:
            if refill is not None:
                refill()
            if not self.keys:
                break
            remaining = cap - pos
            k = bisect.bisect_left(self.keys, (remaining + 1, -1)) - 1   # largest length <= remaining
            if k >= 0:
                # among equal lengths, take the oldest (smallest seq)
                k = bisect.bisect_left(self.keys, (self.keys[k][0], -1))
                pos, e = self._place(row, mask_row, pos, k, remaining)
            elif self.crop or pos == 0:
                pos, e = self._place(row, mask_row, pos, 0, remaining)   # crop the shortest to fill the row
            else:
                break                                                   # SFT: pad the rest
            epoch = max(epoch, e)
            if self.one_per_row:
                break
        return row, mask_row, epoch


class DocLookup:
    """doc id -> (tokens, mask | None). Pretraining: a ShardDocs. SFT: conversations rendered by the tokenizer."""

    def __init__(self, docs=None, conversations=None, tokenizer=None, max_tokens=None):
        self.docs, self.conversations, self.tokenizer, self.max_tokens = docs, conversations, tokenizer, max_tokens

    def __call__(self, i: int):
        if self.docs is not None:
            return self.docs[i], None
        ids, mask = self.tokenizer.render_conversation(self.conversations[i], max_tokens=self.max_tokens)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


class PackSpec:
    """What the packer needs; pickles to grain workers (no open files)."""

    def __init__(self, lookup: DocLookup, mode: str, T: int, buffer_size: int, bos: int | None, pad_id: int):
        self.lookup, self.mode, self.T, self.buffer_size, self.bos, self.pad_id = \
            lookup, mode, T, buffer_size, bos, pad_id


class RowPacker:
    """Pulls (doc id, epoch) chunks from its parent and yields packed rows {"inputs", "targets", "epoch"}.

    Plain Python (grain's `PackIterator` in `nanochat_jax.data.loader` wraps it). Its state: the parent's, the rest
    of the current chunk, and the buffered document ids (or the current document and offset for "concat").
    """

    def __init__(self, parent_it, spec: PackSpec):
        self._parent = parent_it   # yields (K, 2) chunks of (doc id, epoch); has get_state / set_state
        self.spec = spec
        self._reset()

    def __iter__(self):
        return self

    def _reset(self):
        sp = self.spec
        self.queue, self.qpos = np.zeros((0, 2), np.int64), 0   # the current chunk of (doc id, epoch)
        if sp.mode == "concat":
            self.cur = None    # [doc_id, epoch, offset into bos+doc]
        else:
            self.packer = BestFitPacker(sp.T + 1, sp.buffer_size if sp.mode != "sft_pad" else 1, sp.bos,
                                        crop=(sp.mode == "bestfit"), one_per_row=(sp.mode == "sft_pad"),
                                        pad_id=sp.pad_id)

    def _pull(self):
        if self.qpos == len(self.queue):
            self.queue, self.qpos = next(self._parent), 0
        doc_id, epoch = self.queue[self.qpos]
        self.qpos += 1
        return int(doc_id), int(epoch)

    def _concat_row(self):
        cap, bos = self.spec.T + 1, self.spec.bos
        row = np.empty(cap, np.int32)
        pos, epoch = 0, 0
        while pos < cap:
            if self.cur is None:
                self.cur = [*self._pull(), 0]
            doc_id, e, off = self.cur
            toks = self.spec.lookup(doc_id)[0]
            n = len(toks) + 1
            take = min(n - off, cap - pos)
            if off == 0:
                row[pos] = bos
                row[pos + 1:pos + take] = toks[:take - 1]
            else:
                row[pos:pos + take] = toks[off - 1:off - 1 + take]
            pos += take
            epoch = max(epoch, e)
            self.cur = None if off + take == n else [doc_id, e, off + take]
        return row, np.ones(cap, np.int8), epoch

    def __next__(self):
        if self.spec.mode == "concat":
            row, mask, epoch = self._concat_row()
        elif self.spec.mode == "bestfit":
            row, mask, epoch = self.packer.pop_row(refill=self._refill_bestfit)
        else:
            p = self.packer
            while len(p) < p.buffer_size:
                self._add_next()
            row, mask, epoch = p.pop_row()
        targets = np.where(mask[1:] > 0, row[1:], -1).astype(np.int32)
        return {"inputs": row[:-1], "targets": targets, "epoch": np.int32(epoch)}

    def _add_next(self):
        doc_id, e = self._pull()
        toks, m = self.spec.lookup(doc_id)
        self.packer.add(doc_id, e, toks, m)

    def _refill_bestfit(self):
        """nanochat's policy: before every pick, while the buffer holds fewer than buffer_size documents, add the
        next REFILL_DOCS (its tokenizer batch), so the buffer holds buffer_size .. buffer_size + REFILL_DOCS - 1."""
        while len(self.packer) < self.packer.buffer_size:
            for _ in range(REFILL_DOCS):
                self._add_next()

    def get_state(self):
        state = {"parent": self._parent.get_state(), "queue": self.queue[self.qpos:].tolist()}
        if self.spec.mode == "concat":
            state["cur"] = self.cur
        else:
            state["buffer"] = self.packer.buffered()
            state["cropped"], state["packed"] = int(self.packer.cropped), int(self.packer.packed)
        return state

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._reset()
        self.queue = np.asarray(state["queue"], np.int64).reshape(-1, 2)
        if self.spec.mode == "concat":
            self.cur = None if state["cur"] is None else [int(x) for x in state["cur"]]
        else:
            for doc_id, epoch in state["buffer"]:
                toks, m = self.spec.lookup(doc_id)
                self.packer.add(doc_id, epoch, toks, m)
            self.packer.cropped, self.packer.packed = state["cropped"], state["packed"]

