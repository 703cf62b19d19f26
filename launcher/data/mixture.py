"""One reader's whole pipeline: mix its shares of the sources by tokens, pack them into micro-batches, end passes
as ``data.stopping`` says, and say after each batch where it stands (``state``) so that it can resume there.

The stream never ends: when a pass ends, the next one follows (reshuffled when shuffling is on). The state is
plain JSON: per source, the pass over it (cycle), the position of the next document and the tokens drawn from it
in the current pass; and, for each document cut by the end of a batch, where it comes from and how far it was cut.
A restore re-reads (without tokenizing) at most one file per source up to the saved position, and re-tokenizes
the cut documents. After a re-division (:mod:`launcher.data.reshard`) the state also holds, per source, the
explicit list of spans the reader reads in its current pass over it, in place of its parts.

With a weight schedule (``SourceConfig.weight`` a ``{step: weight}`` mapping) the state also holds each source's
target in tokens for the current pass (``targets``) and the rank micro-batch its next batch is (``micro``): the
step of a batch, and so the weights it is drawn at, follow from it. States without them are of plain weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from launcher.config import weight_at
from launcher.data.packing import Packer
from launcher.data.readers import OpenedSource, Position, SourceReader
from launcher.data.sharding import Span
from launcher.data.sources import DataError
from launcher.data.spec import StreamSpec


@dataclass
class SourceState:
    cycle: int = 0
    part: int = 0
    doc: int = 0
    """Position of the next document to draw."""
    tokens: int = 0
    """Tokens drawn from this source in the current pass."""
    done: bool = False
    """Exhausted (all_exhausted) or at its budget (token_budget) in the current pass."""


class Mixture:
    """The micro-batches of one reader (one of ``num_readers``): documents drawn from its shares of the sources,
    EOS appended, packed into ``micro_batch_size x seq_len`` tokens; a document cut by the end of a batch
    continues in the next one."""

    def __init__(
        self, sources: list[OpenedSource], spec: StreamSpec, tokenizer: Any, *, reader: int, num_readers: int,
        what: str,
    ):  # fmt: skip
        self.readers = [
            SourceReader(s, i, spec, tokenizer, reader=reader, num_readers=num_readers, what=what)
            for i, s in enumerate(sources)
        ]
        self.sources = sources
        self.spec = spec
        self.num_readers = num_readers
        self.what = what
        self.schedules = [s.config.weight for s in sources]
        self.scheduled = any(isinstance(w, dict) for w in self.schedules)
        """Some weight is a schedule over the steps: the sources are then chosen by their targets."""
        plain = [w for w in self.schedules if not isinstance(w, dict)]
        self.weights = [] if self.scheduled else [w / sum(plain) for w in plain]
        """The normalised weights, when none is a schedule."""
        self.slots = max(1, num_readers // spec.world_size)
        """DataLoader workers of this reader's rank: the rank's batches are dealt out to them round-robin."""
        self.worker = reader % self.slots
        self.micro = self.worker
        """The rank's micro-batch (from 0) that this reader's next batch is: its step is ``micro // grad_accum``."""
        self.targets = [0.0] * len(sources)
        """With a schedule: the tokens each source should have given in this pass, its normalised weight at the
        step of each batch summed over the tokens drawn for it."""
        self._shares: tuple[int, list[float]] = (-1, [])
        """(step, the normalised weights at that step), for the step being drawn."""
        self.budgets = reader_budgets(spec.budgets, num_readers)
        """This reader's share of each source's budget."""
        self.pass_ = 0
        self.pass_tokens = 0
        self.batches = 0
        self.src = [SourceState() for _ in sources]
        self.packer = Packer(spec.eos_id, len(sources))
        self._iters: list[Iterator[tuple[Position, list[int]]] | None] = [None] * len(sources)
        self._redivided = False
        """The current pass began under another number of readers: its shares are what those had left of it."""
        self._explicit: dict[str, dict[str, Any]] = {}
        """The explicit lists of spans as the state holds them, by source (kept while the source reads its list)."""

    # -- state

    def state(self) -> dict[str, Any]:
        state = {
            "pass": self.pass_,
            "pass_tokens": self.pass_tokens,
            "batches": self.batches,
            "sources": [[s.cycle, s.part, s.doc, s.tokens, int(s.done)] for s in self.src],
            "pending": [[g.source, *g.position, g.start] for g in self.packer.pending],
        }
        explicit = {k: e for k, e in self._explicit.items() if self.readers[int(k)].explicit is not None}
        if explicit:
            state["explicit"] = explicit
        if self.scheduled:
            state["targets"] = list(self.targets)
            state["micro"] = self.micro
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.pass_ = int(state["pass"])
        self.pass_tokens = int(state["pass_tokens"])
        self.batches = int(state["batches"])
        self.src = [SourceState(c, p, d, t, bool(done)) for c, p, d, t, done in state["sources"]]
        self.micro = int(state.get("micro", self.batches * self.slots + self.worker))
        self.targets = [float(t) for t in state.get("targets", [s.tokens for s in self.src])]
        explicit = state.get("explicit") or {}
        for i, reader in enumerate(self.readers):
            e = explicit.get(str(i))
            reader.explicit = None if e is None else (int(e["cycle"]), [Span.from_list(x) for x in e["parts"]])
        self._explicit = {k: {"cycle": e["cycle"], "parts": [list(x) for x in e["parts"]]} for k, e in explicit.items()}
        self._redivided = bool(explicit)
        self.packer.clear()
        for source, cycle, part, doc, start in state["pending"]:
            first = next(self.readers[source].documents(cycle, part, doc, batch=1), None)
            if first is None or first[0] != (cycle, part, doc) or start > len(first[1]):
                raise DataError(
                    f"{self.what}: {self.sources[source].config.path} no longer has the document the saved data "
                    f"position points at (its pass {cycle}, part {part}, document {doc}); the data changed since the "
                    "checkpoint was written"
                )
            self.packer.add(first[1], source, (cycle, part, doc), start=start)

    # -- batches

    def batches_forever(self) -> Iterator[tuple[list[int], list[int], int]]:
        """(token ids of one micro-batch, tokens per source in it, its optimizer step), forever."""
        need = self.spec.batch_tokens
        while True:
            while self.packer.size < need:
                self._draw()
            ids, counts = self.packer.cut(need)
            step = self.micro // self.spec.grad_accum
            self.batches += 1
            self.micro += self.slots
            yield ids, counts, step

    def _draw(self) -> None:
        """Draw one document into the packer, ending cycles and passes as the stopping rule says."""
        while True:
            s = self._choose()
            st = self.src[s]
            it = self._iters[s]
            if it is None:
                it = self._iters[s] = self.readers[s].documents(st.cycle, st.part, st.doc)
            item = next(it, None)
            if item is None:
                self._cycle_ended(s)
                continue
            position, tokens = item
            st.part, st.doc = position[1], position[2] + 1
            self._count(s, self.packer.add(tokens, s, position))
            return

    def _choose(self) -> int:
        """The source furthest below its share of the tokens drawn in this pass (the lowest tokens / weight; under
        token_budget, among the sources below their budget, with the budgets as weights). Mixing by tokens keeps
        every prefix of the stream within one document of the weights, whatever the document lengths; drawing
        documents at random by weight would skew the token shares towards sources with longer documents."""
        if len(self.sources) == 1:
            return 0
        if self.budgets is not None:
            budgets = self.budgets
            active = [i for i, s in enumerate(self.src) if not s.done]
            return min(active, key=lambda i: (self.src[i].tokens / budgets[i], i))
        if self.scheduled:
            # Furthest behind its target, among the sources whose weight at this step is above 0.
            shares = self._shares_now()
            drawing = [i for i, share in enumerate(shares) if share > 0]
            return max(drawing, key=lambda i: (self.targets[i] - self.src[i].tokens, -i))
        return min(range(len(self.src)), key=lambda i: (self.src[i].tokens / self.weights[i], i))

    def _shares_now(self) -> list[float]:
        """The sources' normalised weights at the step of the batch being filled."""
        step = self.micro // self.spec.grad_accum
        if self._shares[0] != step:
            weights = [weight_at(w, step) for w in self.schedules]
            total = sum(weights)
            if total <= 0:
                raise DataError(f"{self.what}: the weights of all sources are 0 at step {step}")
            self._shares = (step, [w / total for w in weights])
        return self._shares[1]

    def _restart(self, s: int) -> None:
        st = self.src[s]
        st.cycle, st.part, st.doc = st.cycle + 1, 0, 0
        self._iters[s] = None
        explicit = self.readers[s].explicit
        if explicit is not None and explicit[0] < st.cycle:
            self.readers[s].explicit = None  # its spans are read: back to this reader's own parts

    def _cycle_ended(self, s: int) -> None:
        st = self.src[s]
        explicit = self.readers[s].explicit
        # A share of another reader's leftovers may be empty; the reader's own share of a whole pass may not.
        if (st.part, st.doc) == (0, 0) and (explicit is None or explicit[0] != st.cycle):
            src = self.sources[s]
            held = src.config.holdout_documents
            after = f" once its first {held} documents are held out for evaluation" if held else ""
            raise DataError(
                f"{self.what}: {src.config.path} has no text for this reader: its {src.num_shards} shard(s) are "
                f"divided among {self.num_readers} readers (world size x data.num_workers) and this one's share is "
                f"empty or blank{after}. Add data, or lower the number of processes or data.num_workers"
                + (" or holdout_documents." if held else ".")
            )
        stopping = self.spec.stopping
        if stopping == "first_exhausted":
            self._end_pass(ran_out=s)
            for i in range(len(self.src)):
                self._restart(i)
        elif stopping == "all_exhausted":
            st.done = True
            self._restart(s)
            if all(x.done for x in self.src):
                self._end_pass()
        else:
            self._restart(s)

    def _count(self, s: int, n: int) -> None:
        st = self.src[s]
        st.tokens += n
        self.pass_tokens += n
        if self.scheduled:
            for i, share in enumerate(self._shares_now()):
                self.targets[i] += n * share
        if self.budgets is not None and st.tokens >= self.budgets[s]:
            st.done = True
            if all(x.done for x in self.src):
                self._end_pass()

    def _end_pass(self, ran_out: int | None = None) -> None:
        spec = self.spec
        redivided, self._redivided = self._redivided, False
        if spec.stopping != "token_budget" and self.pass_tokens < spec.batch_tokens and not redivided:
            why = f" (a pass ends when {self.sources[ran_out].config.path} runs out)" if ran_out is not None else ""
            raise DataError(
                f"{self.what}, pass {self.pass_}: a full pass gives {self.pass_tokens} tokens{why}, fewer than one "
                f"micro-batch of micro_batch_size={spec.micro_batch_size} x seq_len={spec.seq_len}: the training "
                "data is too small for seq_len x micro_batch_size x world size x data.num_workers. Add data, or "
                "lower seq_len, micro_batch_size, the number of processes or data.num_workers."
            )
        self.pass_ += 1
        self.pass_tokens = 0
        for x in self.src:
            x.tokens, x.done = 0, False
        self.targets = [0.0] * len(self.src)


def reader_budgets(budgets: tuple[int, ...] | None, num_readers: int) -> list[int] | None:
    """Each reader's share of each source's token budget (token_budget), or None."""
    return None if budgets is None else [max(1, math.ceil(b / num_readers)) for b in budgets]


def _ints(values: Any, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    )


def _numbers(values: Any, n: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf for v in values)
    )


def valid_reader_state(state: Any, n_sources: int) -> bool:
    """Whether ``state`` has the shape :meth:`Mixture.state` gives (so :meth:`Mixture.restore` can take it), with or
    without the targets and micro-batch of a weight schedule."""
    if not isinstance(state, dict):
        return False
    if not all(isinstance(state.get(k), int) for k in ("pass", "pass_tokens", "batches")):
        return False
    if "targets" in state and not _numbers(state["targets"], n_sources):
        return False
    if "micro" in state and not _ints([state["micro"]], 1):
        return False
    sources, pending, explicit = state.get("sources"), state.get("pending"), state.get("explicit", {})
    if not (
        isinstance(sources, list)
        and len(sources) == n_sources
        and all(_ints(s, 5) for s in sources)
        and isinstance(pending, list)
        and all(_ints(p, 5) and p[0] < n_sources for p in pending)
        and isinstance(explicit, dict)
    ):
        return False
    for key, e in explicit.items():
        # A list of spans is kept only while its source is in that cycle.
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < n_sources):
            return False
        if not isinstance(e, dict):
            return False
        spans = e.get("parts")
        if e.get("cycle") != sources[int(key)][0] or not isinstance(spans, list) or not all(map(Span.valid, spans)):
            return False
    return True
