"""Training and evaluation data: streamed sources -> each reader's share -> mix -> tokenize -> pack -> batches."""

from launcher.data.loader import TrainStream, eval_blocks, source_labels
from launcher.data.packing import document_position_ids, pack, tokenize_documents
from launcher.data.sharding import Part, assign_parts
from launcher.data.sources import DataError, check_sources, open_source

__all__ = [
    "DataError",
    "Part",
    "TrainStream",
    "assign_parts",
    "check_sources",
    "document_position_ids",
    "eval_blocks",
    "open_source",
    "pack",
    "source_labels",
    "tokenize_documents",
]
