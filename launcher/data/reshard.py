"""A data position carried over exactly to another number of readers (world size x DataLoader workers).

A reader's share of a source depends on the number of readers (:func:`launcher.data.sharding.assign_parts`), so
the saved position of one layout cannot be continued as it is on another. Instead, what the old readers had left
of the passes they were in is written down as spans (:class:`launcher.data.sharding.Span`: documents of a part,
named without naming who reads them) and dealt to the new readers. Per source, with ``C`` the latest pass (cycle)
over it that any old reader had begun:

* an old reader in pass ``c`` leaves the rest of the part it was in, its later parts of pass ``c``, and all its
  parts of passes ``c + 1`` to ``C`` (an old reader that was itself reading such a list leaves the rest of it);
* a document cut by the end of an old reader's last batch becomes a span of that one document at the front of a
  new reader's list, and the new reader continues it from the token where it was cut;
* the cut documents are dealt round-robin to the new readers first, in the order of the old readers; then the
  leftover spans, in the order of the old readers and their parts, round-robin as well. A new reader reads its
  list as its pass ``C`` over the source, and continues with pass ``C + 1`` as its own share among the new number
  of readers. Spans are dealt whole (how many documents a part has is not known without reading it), so the new
  readers' lists may differ in length; a reader dealt nothing ends that pass at once.

Exact, to the token: across the change, every document of each source's passes up to ``C`` is read once over all
readers, none twice and none skipped, and each cut document continues where it was cut (``first_exhausted`` is the
exception it always is: a reader's pass ends when one of its sources runs out, and it does not read the rest of
the others' lists). Approximate: the counters that steer the mixture and the ends of passes. Each new reader
starts in the earliest pass any old reader was in, with an even share of the tokens the old readers drew from
each source in that pass (under ``token_budget``, an old reader already in a later pass counts its whole share of
that pass as drawn). A source counts as run out in that pass (``all_exhausted``) if every old reader in the pass
had run out of it, or as at its budget (``token_budget``) if the new reader's share of the tokens reaches its
share of the budget. With a weight schedule, each new reader also gets an even share of the old readers' targets
in that pass (so a source behind or ahead of its schedule stays so, on average), and the rank micro-batch its
next batch is: the first of the step the old ranks had reached (the micro-batches they had consumed, over all of
them, divided by those of a step), so the schedule goes on at the step the run is at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from launcher.data.mixture import reader_budgets, valid_reader_state
from launcher.data.readers import OpenedSource, open_training_source
from launcher.data.sharding import Span, assign_parts, shard_order
from launcher.data.sources import DataError
from launcher.data.spec import StreamSpec


def old_readers(all_ranks: Any, n_sources: int, versions: Sequence[int]) -> list[dict[str, Any]] | None:
    """The reader states of every rank of a saved run, in reader order (rank x workers + worker), from the
    ``TrainStream.state_dict()`` of each rank (``all_ranks[rank]``); a reader that had not given a batch yet gets
    the state of a fresh reader. None unless ``all_ranks`` is the complete set of one run's exact states: one per
    rank, of one layout, each with the state of every reader."""
    if not isinstance(all_ranks, list) or not all_ranks or not all(isinstance(s, dict) for s in all_ranks):
        return None
    layout = all_ranks[0].get("layout")
    if not isinstance(layout, dict) or layout.get("world_size") != len(all_ranks):
        return None
    slots = layout.get("num_workers")
    if not isinstance(slots, int) or slots < 1:
        return None
    readers: list[dict[str, Any]] = []
    for rank, state in enumerate(all_ranks):
        workers = state.get("workers")
        if (
            state.get("version") not in versions
            or not isinstance(state.get("batches"), int)
            or state.get("layout") != {**layout, "rank": rank}
            or not isinstance(workers, list)
            or len(workers) != slots
            or not all(w is None or valid_reader_state(w, n_sources) for w in workers)
        ):
            return None
        readers += [fresh_state(n_sources) if w is None else w for w in workers]
    return readers


def fresh_state(n_sources: int) -> dict[str, Any]:
    """The state of a reader that has not given a batch yet."""
    return {"pass": 0, "pass_tokens": 0, "batches": 0, "sources": [[0] * 5 for _ in range(n_sources)], "pending": []}


def merged_source_tokens(all_ranks: list[dict[str, Any]], n_sources: int) -> list[int]:
    """The tokens consumed per source over all saved ranks (zeros where a rank's counts are missing)."""
    counts: list[Any] = [state.get("source_tokens") for state in all_ranks]
    if not all(isinstance(c, list) and len(c) == n_sources for c in counts):
        return [0] * n_sources
    return [sum(int(c[i]) for c in counts) for i in range(n_sources)]


def merged_hash(all_ranks: list[dict[str, Any]]) -> str:
    """A digest of the running hashes of all saved ranks, in rank order, for the new ranks to continue from."""
    hashes: list[Any] = [state.get("hash") for state in all_ranks]
    if not all(isinstance(h, str) and len(h) == 16 for h in hashes):
        return "00" * 8
    return hashlib.blake2b(bytes.fromhex("".join(hashes)), digest_size=8).hexdigest()


def old_divisions(sources: list[OpenedSource], old: int, new: int) -> list[int]:
    """How many shards each source was divided into for ``old`` readers, now that it is divided for ``new``. A
    source with fewer files than readers is split per Parquet row group: where that differs between the two, the
    source is also opened divided the old way (into its ``others``)."""
    shards = []
    for src in sources:
        if (src.files < old) == (src.files < new):
            shards.append(src.num_shards)
        elif src.files >= old:
            shards.append(src.files)
        else:
            other = open_training_source(src.config, old)
            if other.num_shards != src.num_shards:
                src.others[other.num_shards] = other
            shards.append(other.num_shards)
    return shards


def open_divisions(sources: list[OpenedSource], states: Sequence[dict[str, Any] | None]) -> None:
    """Open each source also divided as the spans of the reader states ``states`` need it (a position saved after
    a change of the number of readers may name shards of the old division)."""
    for state in states:
        for key, entry in ((state or {}).get("explicit") or {}).items():
            src = sources[int(key)]
            for shards in {values[1] for values in entry["parts"]}:
                if shards != src.num_shards and shards not in src.others:
                    src.others[shards] = open_training_source(src.config, shards, num_shards=shards)


def redivide(
    old: list[dict[str, Any]],
    num_readers: int,
    *,
    shards: Sequence[int],
    spec: StreamSpec,
    old_workers: int = 1,
    old_accum: int = 1,
) -> list[dict[str, Any]]:
    """The states of ``num_readers`` new readers (``Mixture.state``) that continue the position of the old readers
    ``old`` (in reader order), as the module describes. ``shards``: how many shards the old readers divided each
    source into; ``spec``: the stream's settings, which must be the old ones but for the number of readers (and
    of micro-batches per step); ``old_workers``: the readers of each old rank; ``old_accum``: their micro-batches
    per step."""
    n = len(shards)
    last = [max(state["sources"][i][0] for state in old) for i in range(n)]
    spans: list[list[list[Span]]] = [[[] for _ in range(n)] for _ in range(num_readers)]
    pending: list[list[list[int]]] = [[] for _ in range(num_readers)]
    cut = 0
    for r, state in enumerate(old):
        for source, cycle, part, doc, start in state["pending"]:
            theirs = _spans(state, r, len(old), source, cycle, shards[source], spec)
            if part >= len(theirs) or not theirs[part].holds(doc):
                raise DataError(f"the saved data position of reader {r} names a document it does not have")
            mine = spans[cut % num_readers][source]
            mine.append(replace(theirs[part], start=doc, stop=doc + 1))
            pending[cut % num_readers].append([source, last[source], len(mine) - 1, doc, start])
            cut += 1
    heads = [[len(x) for x in reader] for reader in spans]
    for i in range(n):
        dealt = 0
        for r, state in enumerate(old):
            for span in _leftovers(state, r, len(old), i, last[i], shards[i], spec):
                spans[dealt % num_readers][i].append(span)
                dealt += 1
    counters = _counters(old, num_readers, spec)
    batches = sum(state["batches"] for state in old) // num_readers
    states: list[dict[str, Any]] = [
        {
            "pass": pass_,
            "pass_tokens": sum(tokens),
            "batches": batches,
            "sources": [[last[i], heads[j][i], 0, tokens[i], int(done[i])] for i in range(n)],
            "pending": pending[j],
            "explicit": {str(i): {"cycle": last[i], "parts": [s.to_list() for s in spans[j][i]]} for i in range(n)},
        }
        for j, (pass_, tokens, done, _) in enumerate(counters)
    ]
    if any("targets" in state for state in old):  # a weight schedule
        slots = max(1, num_readers // spec.world_size)
        steps = _consumed(old, old_workers) // (len(old) // old_workers * old_accum)
        for j, (state, (*_, targets)) in enumerate(zip(states, counters)):
            # The new rank's DataLoader asks its worker 0 first, for the first micro-batch of step `steps`.
            state.update(targets=targets, micro=steps * spec.grad_accum + j % slots)
    return states


def _consumed(old: list[dict[str, Any]], old_workers: int) -> int:
    """The micro-batches every old rank had consumed, summed over the ranks. A rank's readers take its micro-batches
    in turn, so the one it consumes next is the least of its readers' next ones."""
    total = 0
    for first in range(0, len(old), old_workers):
        readers = old[first : first + old_workers]
        total += min(state.get("micro", state["batches"] * old_workers + w) for w, state in enumerate(readers))
    return total


def _spans(
    state: dict[str, Any], reader: int, num_readers: int, source: int, cycle: int, shards: int, spec: StreamSpec
) -> list[Span]:
    """What old reader ``reader`` reads of ``source`` in ``cycle``: its explicit list, or its parts."""
    entry = (state.get("explicit") or {}).get(str(source))
    if entry is not None and entry["cycle"] == cycle:
        return [Span.from_list(values) for values in entry["parts"]]
    order = shard_order(shards, seed=spec.seed, source=source, cycle=cycle, shuffle=spec.shuffle_buffer > 0)
    return [Span(cycle, shards, part) for part in assign_parts(shards, num_readers, reader, order)]


def _leftovers(
    state: dict[str, Any], reader: int, num_readers: int, source: int, last: int, shards: int, spec: StreamSpec
) -> list[Span]:
    """What old reader ``reader`` had not drawn yet of ``source`` in its passes up to ``last``."""
    cycle, part, doc = state["sources"][source][:3]
    theirs = _spans(state, reader, num_readers, source, cycle, shards, spec)
    out = []
    if part < len(theirs):
        rest = replace(theirs[part], start=max(doc, theirs[part].start))
        if rest.holds(rest.start):
            out.append(rest)
        out += theirs[part + 1 :]
    for later in range(cycle + 1, last + 1):
        out += _spans(state, reader, num_readers, source, later, shards, spec)
    return out


def _counters(
    old: list[dict[str, Any]], num_readers: int, spec: StreamSpec
) -> list[tuple[int, list[int], list[bool], list[float]]]:
    """(pass, tokens drawn per source in it, sources run out or at their budget in it, targets per source in it
    under a weight schedule) of each new reader."""
    n = len(old[0]["sources"])
    first = min(state["pass"] for state in old)
    current = [state for state in old if state["pass"] == first]
    totals = [sum(state["sources"][i][3] for state in current) for i in range(n)]
    # A state without targets (a reader that had not given a batch) is on target.
    aims = [sum(state.get("targets", [s[3] for s in state["sources"]])[i] for state in current) for i in range(n)]
    old_budgets, budgets = reader_budgets(spec.budgets, len(old)), reader_budgets(spec.budgets, num_readers)
    if old_budgets is not None:
        totals = [t + (len(old) - len(current)) * b for t, b in zip(totals, old_budgets)]
    out = []
    for j in range(num_readers):
        tokens = [t // num_readers + (j < t % num_readers) for t in totals]
        if budgets is not None:
            done = [t >= b for t, b in zip(tokens, budgets)]
        elif spec.stopping == "all_exhausted":
            done = [all(state["sources"][i][4] for state in current) for i in range(n)]
        else:
            done = [False] * n
        if all(done):  # the new reader's share of this pass is drawn already
            out.append((first + 1, [0] * n, [False] * n, [0.0] * n))
        else:
            out.append((first, tokens, done, [a / num_readers for a in aims]))
    return out
