"""Sequence-length stages (``data.seq_len_stages``): which stage an optimizer step is in, and its micro-batches cut
into blocks of the stage's length.

A rank's micro-batch always holds ``micro_batch_size x seq_len`` tokens of the packed stream, whatever the stage
(a stage at ``s`` tokens takes ``micro_batch_size x seq_len / s`` blocks): the stream itself, its documents, their
order and its resumable position, does not depend on the stages. A stage only says where the blocks end: a
micro-batch of ``[micro_batch_size, seq_len]`` is the same tokens as ``[micro_batch_size x seq_len / s, s]`` blocks
cut from the same stretch of the stream, which is what packing at ``s`` gives. So a resume is exact whatever the
stage: the data position carries over as it always does, and the step the run resumes at (in its checkpoint) gives
the stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from launcher.config import DataConfig
from launcher.data.packing import document_position_ids


@dataclass(frozen=True)
class Stage:
    """One sequence-length stage of a rank's training."""

    index: int
    """Position in ``data.seq_len_stages``, from 0 (0 without stages)."""
    seq_len: int
    micro_batch_size: int
    """Blocks per micro-batch of a rank: ``train.micro_batch_size x data.seq_len / seq_len``."""
    first_step: int
    """The optimizer step (counted from 1) it begins with."""
    last_step: int | None
    """Its ``until_step``: the last step in it; None for the last stage."""


def stages_of(data: DataConfig, micro_batch_size: int) -> list[Stage]:
    """The stages of a (checked) recipe's ``data`` for a rank's ``micro_batch_size`` at ``data.seq_len``: one stage
    of ``data.seq_len`` without ``seq_len_stages``."""
    if not data.seq_len_stages:
        return [Stage(0, data.seq_len, micro_batch_size, 1, None)]
    stages, first = [], 1
    for i, s in enumerate(data.seq_len_stages):
        assert s.seq_len is not None and data.seq_len % s.seq_len == 0, "the recipe check makes sure"
        last = None if i == len(data.seq_len_stages) - 1 else s.until_step
        stages.append(Stage(i, s.seq_len, micro_batch_size * data.seq_len // s.seq_len, first, last))
        first = (last or 0) + 1
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage optimizer step ``step`` (counted from 1) is in."""
    for stage in stages:
        if stage.last_step is None or step <= stage.last_step:
            return stage
    return stages[-1]


def reblock(batch: dict[str, torch.Tensor], stage: Stage, eos_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of the stream (``input_ids``, ``labels`` and, with document masking, ``position_ids``, each
    ``[B, T]``) as blocks of ``stage.seq_len`` tokens: the same tokens in the same order, ``[B x T / seq_len,
    seq_len]``; the positions restart at each block and after every EOS, as packing at ``seq_len`` gives them."""
    ids = batch["input_ids"]
    if ids.shape[1] == stage.seq_len:
        return batch
    rows = ids.numel() // stage.seq_len
    out = {k: v.reshape(rows, stage.seq_len) for k, v in batch.items() if k != "position_ids"}
    if "position_ids" in batch:
        out["position_ids"] = document_position_ids(out["input_ids"], eos_id)
    return out
