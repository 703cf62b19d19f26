"""One rank's endless stream of training micro-batches: the DataLoader around the readers, and its position.

Every (rank, DataLoader worker) is one reader (:mod:`launcher.data.mixture`); the DataLoader hands the readers'
batches out round-robin, so batch ``n`` of a rank always comes from worker ``n % num_workers``. Each batch carries
its reader's state after it. The trainer keeps the state of the last batch it consumed from each worker, so a
checkpoint records exactly what was consumed, not what the workers had prefetched.

Also here: the data metrics of the training log (the mixture consumed, a running hash of the consumed token ids).
What runs inside the DataLoader workers is in :mod:`launcher.data.workers`.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from launcher.config import DataConfig, SourceConfig, source_labels, weight_at
from launcher.data.mixture import valid_reader_state
from launcher.data.packing import eos_id_of
from launcher.data.readers import open_training_source
from launcher.data.reshard import (
    merged_hash,
    merged_source_tokens,
    old_divisions,
    old_readers,
    open_divisions,
    redivide,
)
from launcher.data.sources import DataError
from launcher.data.spec import StreamSpec, budgets_of
from launcher.data.workers import RUNNING_LOADERS, RankShare, init_worker, source_paths, stop_workers

logger = logging.getLogger(__name__)

STATE_VERSION = 3
"""Of the format of ``TrainStream.state_dict`` and of the reader states in it. Version 3 added the explicit lists
of spans of a re-divided position; a version 2 state is a version 3 state without them. The keys added since are
optional (a weight schedule's ``targets`` and ``micro`` in the reader states, ``logged_tokens``): a state without
them loads as before."""

READABLE_VERSIONS = (2, 3)


def _chain_hash(previous: str, input_ids: torch.Tensor) -> str:
    h = hashlib.blake2b(bytes.fromhex(previous), digest_size=8)
    h.update(input_ids.contiguous().numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


def _hash48(*values: int) -> int:
    """A number that fits a float64 exactly (W&B stores floats)."""
    h = hashlib.blake2b(b"".join(v.to_bytes(8, "little", signed=False) for v in values), digest_size=8)
    return int.from_bytes(h.digest()[:6], "little")


class TrainStream:
    """The endless stream of training micro-batches of one rank: ``{"input_ids", "labels"}``, LongTensor[B, T],
    plus ``position_ids`` (restarting after every EOS) with ``document_masking``.

    Every (rank, DataLoader worker) is one reader with its own part of every source (see
    :func:`launcher.data.sharding.assign_parts`): whole files where there are at least as many files as readers,
    and the files left over shared document by document. A reader that shares a file reads all of it but tokenizes
    only its own documents, so a source of fewer, larger files costs more reading; Parquet sources with fewer
    files than readers are split per row group instead, which needs no sharing. Each reader mixes its parts of
    the sources in proportion to their weights (or token budgets) counted in tokens, tokenizes, appends EOS and
    cuts the stream into micro-batches; a document cut by the end of a batch continues in the reader's next
    batch. Passes end as ``stopping`` says and follow each other without a gap. The documents a source holds out
    for evaluation (``holdout_documents``) are never read by any rank or worker.

    The sources and settings are taken as the recipe check (``launcher.config``) leaves them; under
    ``stopping: token_budget`` each source's budget is computed from them (``token_budget`` split by the weights,
    or each source's own) without checking them again.

    A weight schedule (``SourceConfig.weight`` a ``{step: weight}`` mapping) is read at the optimizer step of each
    batch: the rank's micro-batch ``m`` (from 0) is of step ``m // grad_accum``.

    Deterministic given the sources, seed, world size, num_workers, seq_len, micro_batch_size, shuffle_buffer
    and stopping rule (and grad_accum, with a weight schedule). ``state_dict``/``load_state_dict`` resume exactly:
    after loading, iteration yields the batches an uninterrupted run would have yielded next. Given the states of
    every rank, ``load_state_dict`` also carries a position over exactly to another world size or num_workers
    (:mod:`launcher.data.reshard`). Each ``iter()`` continues from the current position.
    ``gather_metrics`` reports the mixture actually consumed, in tokens (in all and since its previous call), the
    scheduled weights, and a running hash of the consumed token ids.
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        tokenizer: Any,
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        shuffle_buffer: int = 0,
        stopping: str = "all_exhausted",
        token_budget: int | None = None,
        document_masking: bool = False,
        grad_accum: int = 1,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_factor <= 0:
            raise ValueError(f"prefetch_factor must be positive, got {prefetch_factor}")
        if not sources:
            raise DataError("no training sources: data.train is empty")
        self.sources = list(sources)
        self.scheduled = any(isinstance(s.weight, dict) for s in self.sources)
        """Some source's weight is a schedule over the steps."""
        if self.scheduled and stopping == "token_budget":
            raise ValueError("a weight schedule does not work with stopping=token_budget (the budgets are fixed)")
        self.spec = StreamSpec(
            seq_len=seq_len, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
            eos_id=eos_id_of(tokenizer, f"training data {source_paths(self.sources)}"), shuffle_buffer=shuffle_buffer,
            stopping=stopping, budgets=budgets_of(self.sources, stopping, token_budget),
            document_masking=document_masking, grad_accum=grad_accum,
        )  # fmt: skip
        self.tokenizer = tokenizer
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.labels = source_labels(self.sources)
        self._slots = max(1, num_workers)
        self._sources = [open_training_source(s, world_size * self._slots) for s in self.sources]
        self._batches = 0
        self._states: list[dict[str, Any] | None] = [None] * self._slots
        self._replay = False
        self._source_tokens = [0] * len(self.sources)
        self._logged_tokens = [0] * len(self.sources)
        """This rank's ``_source_tokens`` at the last ``gather_metrics``: ``data/mix_recent`` counts from there."""
        self._step: int | None = None
        """The optimizer step of the last batch consumed (None until one is, after a load)."""
        self._hash = "00" * 8
        self._active: weakref.ref | None = None
        """The live iterator, weakly: it refers to this stream, and a cycle would delay stopping its workers."""

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        tokenizer: Any,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        grad_accum: int = 1,
    ) -> TrainStream:
        """The stream a recipe's ``data`` section describes; ``grad_accum``: micro-batches per optimizer step."""
        return cls(
            data.train, tokenizer, seq_len=data.seq_len, micro_batch_size=micro_batch_size, rank=rank,
            world_size=world_size, seed=seed, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
            shuffle_buffer=data.shuffle_buffer, stopping=data.stopping, token_budget=data.token_budget,
            document_masking=data.document_masking, grad_accum=grad_accum,
        )  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._close_active()
        iterator = self._iterate()
        self._active = weakref.ref(iterator)
        return iterator

    def _close_active(self) -> None:
        """Stop the previous iterator and its workers: the position it would continue from is no longer valid."""
        iterator = self._active() if self._active is not None else None
        if iterator is not None:
            iterator.close()  # type: ignore[attr-defined]
        self._active = None

    def _iterate(self) -> Iterator[dict[str, torch.Tensor]]:
        share = RankShare(
            self._sources, self.spec, self.tokenizer, start_batches=self._batches, states=list(self._states),
            replay=self._replay,
        )  # fmt: skip
        workers = self.num_workers
        loader = DataLoader(
            share,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            worker_init_fn=init_worker if workers else None,
        )
        iterator = iter(loader)
        if workers:
            RUNNING_LOADERS.add(iterator)
        try:
            for item in iterator:
                if "error" in item:
                    raise DataError(item["error"]) from None
                if "placeholder" in item:
                    continue
                self._states[item["worker"]] = item["state"]
                if self._replay and all(s is not None for s in self._states):
                    self._replay = False
                self._batches += 1
                self._step = item["step"]
                for i, n in enumerate(item["source_tokens"]):
                    self._source_tokens[i] += int(n)
                self._hash = _chain_hash(self._hash, item["input_ids"])
                yield {k: item[k] for k in ("input_ids", "labels", "position_ids") if k in item}
        finally:
            stop_workers(iterator)

    def _layout(self) -> dict[str, Any]:
        """Everything the data order depends on; a resume is exact only when it is unchanged."""
        spec = self.spec
        # Only with a schedule, so that states saved before schedules existed still match.
        scheduled = {"grad_accum": spec.grad_accum} if self.scheduled else {}
        return {
            "rank": spec.rank,
            "world_size": spec.world_size,
            "num_workers": self._slots,
            "seed": spec.seed,
            "seq_len": spec.seq_len,
            "micro_batch_size": spec.micro_batch_size,
            "shuffle_buffer": spec.shuffle_buffer,
            "stopping": spec.stopping,
            "budgets": None if spec.budgets is None else list(spec.budgets),
            "sources": [
                {
                    "path": s.path,
                    "name": s.name,
                    "split": s.split,
                    "text_field": s.text_field,
                    # a schedule as [step, weight] pairs: JSON would make its steps strings
                    "weight": [[k, w] for k, w in s.weight.items()] if isinstance(s.weight, dict) else s.weight,
                }
                # Only when set, so that states saved before holdouts existed still match.
                | ({"holdout_documents": s.holdout_documents} if s.holdout_documents else {})
                for s in self.sources
            ],
        } | scheduled

    def gather_metrics(self) -> dict[str, float]:
        """Collective: every rank must call this at the same steps. Data metrics for the training log, merged into
        metrics.jsonl and W&B.

        ``data/mix/<label>``: the fraction of the training tokens consumed so far (EOS included) that came from
        each source -- compare with the weights. ``data/batch_hash``: a hash of every token id consumed so far, in
        order; two runs (or a run and its resumed continuation) that trained on the same data show the same
        value at the same step. ``data/epochs/<label>``: the passes over each source that every reader has
        finished (a finite source's epochs; under ``all_exhausted`` a smaller source is read more often).
        With a weight schedule (some ``SourceConfig.weight`` a ``{step: weight}`` mapping), also
        ``data/mix_recent/<label>``: the same fraction over the tokens consumed since the previous call (since the
        resume, at the first call after one), which shows the mixture as it changes, and ``data/weight/<label>``:
        each source's weight at the step of the last batch consumed, normalised over the sources -- what
        ``data/mix_recent`` follows.

        When torch.distributed is initialised with this stream's world size, they cover every rank (one small
        all_gather); otherwise they cover this rank.
        """
        counts = list(self._source_tokens)
        recent = [n - m for n, m in zip(self._source_tokens, self._logged_tokens)]
        self._logged_tokens = list(self._source_tokens)
        hashes = [int(self._hash, 16)]
        known = not self._replay and all(st is not None for st in self._states)
        epochs = [min(int(st["sources"][i][0]) for st in self._states if st is not None) if known else -1
                  for i in range(len(self.sources))]  # fmt: skip
        import torch.distributed as dist

        spec = self.spec
        # the ranks of a sequence-parallel group (contiguous, ``world / spec.world_size`` of them) read the same
        # stream: gathered over every rank, one row per data-parallel rank is kept
        group = dist.get_world_size() // spec.world_size if dist.is_available() and dist.is_initialized() else 0
        if (
            spec.world_size > 1
            and group
            and dist.get_world_size() == group * spec.world_size
            and dist.get_rank() // group == spec.rank
        ):
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            # Hashes are 64-bit; sent as two 32-bit halves so no value needs the sign bit of an int64.
            h = hashes[0]
            values = [*counts, *recent, *epochs, h >> 32, h & 0xFFFFFFFF]
            mine = torch.tensor(values, dtype=torch.long, device=device)
            gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mine)
            rows = torch.stack(gathered).cpu().tolist()[::group]
            width = len(counts)
            counts = [sum(r[i] for r in rows) for i in range(width)]
            recent = [sum(r[width + i] for r in rows) for i in range(width)]
            epochs = [min(r[2 * width + i] for r in rows) for i in range(len(epochs))]
            hashes = [(r[-2] << 32) | r[-1] for r in rows]
        total = sum(counts)
        out: dict[str, float] = {}
        if total:
            out.update({f"data/mix/{label}": n / total for label, n in zip(self.labels, counts)})
        recent_total = sum(recent)
        if self.scheduled and recent_total:
            out.update({f"data/mix_recent/{label}": n / recent_total for label, n in zip(self.labels, recent)})
        if self.scheduled:
            step = self._step if self._step is not None else max(0, self._batches - 1) // spec.grad_accum
            weights = [weight_at(s.weight, step) for s in self.sources]
            out.update({f"data/weight/{label}": w / sum(weights) for label, w in zip(self.labels, weights)})
        out["data/batch_hash"] = _hash48(*hashes)
        if min(epochs, default=-1) >= 0:
            out.update({f"data/epochs/{label}": float(n) for label, n in zip(self.labels, epochs)})
        return out

    def passes_completed(self) -> int | None:
        """Passes over the training data that every reader of this rank has finished (an epoch, with one source);
        None until each reader's position is known."""
        if self._replay or any(s is None for s in self._states):
            return None
        return min(int(s["pass"]) for s in self._states if s is not None)

    def state_dict(self) -> dict[str, Any]:
        """The position as plain JSON: micro-batches yielded so far, each worker's reader state after the last
        batch taken from it, the tokens consumed per source (also as of the last ``gather_metrics``) and the running
        hash of the consumed token ids."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "workers": None if self._replay else [dict(s) if s is not None else None for s in self._states],
            "source_tokens": list(self._source_tokens),
            "logged_tokens": list(self._logged_tokens),
            "hash": self._hash,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any], all_ranks: list[dict[str, Any]] | None = None) -> None:
        """Continue from ``state``: the next iteration yields exactly what the saved run would have yielded next.

        ``all_ranks``, the saved states of every rank of the saved run (``all_ranks[rank]``, for the old ranks),
        also carries the position over exactly to another world size or number of DataLoader workers: what the
        old readers had left is divided among the new ones (:mod:`launcher.data.reshard`). No document is then
        read twice or skipped, and a document cut by the end of a batch continues at the token where it was cut;
        the counters that steer the mixture and end passes carry over approximately. The tokens consumed per
        source are summed into rank 0's, so that the totals of ``gather_metrics`` stay right; the running hash of
        every rank continues from a digest of the old ranks' hashes (it still fingerprints the data consumed, but
        no longer matches a run that kept its layout). With the layout unchanged, ``all_ranks[rank]`` is loaded.

        If anything else of the layout changed (seed, seq_len, micro-batch, shuffle buffer, stopping rule, sources
        and their holdouts), or the world size or workers changed and ``all_ranks`` is missing (or not every old
        rank's exact state), the saved order cannot be reproduced: the stream skips as many micro-batches as were
        consumed, and warns. A state saved by another rank of the same layout (or by an older version) is still
        exact, only slower to reach: the batches before it are produced again and dropped.
        """
        if not isinstance(state, dict) or not isinstance(state.get("batches"), int) or state["batches"] < 0:
            raise ValueError(f"not a TrainStream state: {state!r}")
        self._close_active()
        if all_ranks is not None and self._load_all(all_ranks):
            return
        saved = state.get("layout") or {}
        mine = self._layout()
        changed = self._changes(saved)
        if changed:
            logger.warning(
                "data layout changed since the saved state (%s); skipping %d micro-batches of the new layout, "
                "which is not the saved data order",
                ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in changed),
                state["batches"],
            )
        elif state.get("version") not in READABLE_VERSIONS and state["batches"]:
            logger.warning(
                "the data position was saved by another version of the data pipeline (%s, this is %s); skipping %d "
                "micro-batches, which is not the saved data order",
                state.get("version"),
                STATE_VERSION,
                state["batches"],
            )
        workers = state.get("workers")
        exact = (
            not changed
            and state.get("version") in READABLE_VERSIONS
            and saved.get("rank") == self.spec.rank
            and isinstance(workers, list)
            and len(workers) == self._slots
            and all(w is None or valid_reader_state(w, len(self.sources)) for w in workers)
        )
        self._batches = state["batches"]
        self._states = [dict(w) if w is not None else None for w in workers] if exact else [None] * self._slots  # type: ignore[union-attr]
        self._replay = not exact and self._batches > 0
        open_divisions(self._sources, self._states)
        tokens = state.get("source_tokens")
        same_sources = saved.get("sources") == mine["sources"]
        ok = same_sources and isinstance(tokens, list) and len(tokens) == len(self.sources)
        self._source_tokens = [int(n) for n in tokens] if ok else [0] * len(self.sources)  # type: ignore[union-attr]
        logged = state.get("logged_tokens")
        ok = ok and isinstance(logged, list) and len(logged) == len(self.sources)
        self._logged_tokens = [int(n) for n in logged] if ok else list(self._source_tokens)  # type: ignore[union-attr]
        self._step = None
        digest = state.get("hash")
        self._hash = digest if isinstance(digest, str) and len(digest) == 16 else "00" * 8

    def _changes(self, saved: dict[str, Any]) -> list[str]:
        """What of this stream's layout differs from the saved one (the rank aside)."""
        mine = self._layout()
        changed = [k for k in mine if k not in ("rank", "stopping", "budgets") and saved.get(k) != mine[k]]
        return changed + [k for k in ("stopping", "budgets") if saved.get(k, mine[k]) != mine[k]]

    def _load_all(self, all_ranks: list[dict[str, Any]]) -> bool:
        """Load the position of every old rank: this rank's exactly, or re-divided among this layout's readers.
        False where neither can be done exactly."""
        readers = old_readers(all_ranks, len(self.sources), READABLE_VERSIONS)
        if readers is None:
            return False
        saved = all_ranks[0]["layout"]
        changed = self._changes(saved)
        if not changed:
            self.load_state_dict(all_ranks[self.spec.rank])
            return True
        # With a weight schedule, grad_accum follows the world size (or the global batch, if that changed).
        if not set(changed) <= {"world_size", "num_workers", "grad_accum"}:
            return False
        spec, slots = self.spec, self._slots
        count = spec.world_size * slots
        shards = old_divisions(self._sources, len(readers), count)
        mine: list[dict[str, Any] | None] = list(
            redivide(
                readers,
                count,
                shards=shards,
                spec=spec,
                old_workers=saved["num_workers"],
                old_accum=saved.get("grad_accum", spec.grad_accum),
            )
        )
        self._states = mine[spec.rank * slots : (spec.rank + 1) * slots]
        open_divisions(self._sources, self._states)
        self._replay = False
        # About this rank's share of the batches consumed, and worker 0's turn next, as it is for fresh states.
        self._batches = sum(s["batches"] for s in all_ranks) // spec.world_size // slots * slots
        tokens = merged_source_tokens(all_ranks, len(self.sources))
        self._source_tokens = tokens if spec.rank == 0 else [0] * len(self.sources)
        self._logged_tokens = list(self._source_tokens)
        self._step = None
        self._hash = merged_hash(all_ranks)
        logger.info(
            "data position re-divided from %d old readers (%d ranks x %d workers) to %d new readers (%d ranks x %d "
            "workers): no document is read twice or skipped",
            len(readers), saved["world_size"], saved["num_workers"], count, spec.world_size, slots,
        )  # fmt: skip
        return True
