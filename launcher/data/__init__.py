"""Training and evaluation data: streamed sources -> each reader's share -> mix -> tokenize -> pack -> batches.

The rooms, in the order data flows through them: ``sources`` (reading any format as text), ``sharding`` (which
reader takes which shard), ``readers`` (one reader's share of one source), ``packing`` (the tokenize loop and
the packer), ``mixture`` (one reader's mix of its sources, passes and resumable state), ``spec`` (the settings a
stream is built from), ``stream`` (one rank's training batches through a DataLoader), ``stages`` (the blocks of a
sequence-length stage) and ``eval`` (eval blocks).
"""

from launcher.config import source_labels
from launcher.data.eval import eval_blocks
from launcher.data.packing import document_position_ids, pack, tokenize_documents
from launcher.data.sharding import Part, assign_parts
from launcher.data.sources import DataError, check_sources, open_source
from launcher.data.stages import Stage, reblock, stage_at, stages_of
from launcher.data.stream import TrainStream

__all__ = [
    "DataError",
    "Part",
    "Stage",
    "TrainStream",
    "assign_parts",
    "check_sources",
    "document_position_ids",
    "eval_blocks",
    "open_source",
    "pack",
    "reblock",
    "source_labels",
    "stage_at",
    "stages_of",
    "tokenize_documents",
]
