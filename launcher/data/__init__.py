"""Training and evaluation data: streamed sources -> this rank's share -> tokenize -> pack into blocks -> batches."""

from launcher.data.loader import TrainStream, eval_blocks
from launcher.data.packing import pack, tokenize_documents
from launcher.data.sources import DataError, check_sources, open_source

__all__ = ["DataError", "TrainStream", "check_sources", "eval_blocks", "open_source", "pack", "tokenize_documents"]
