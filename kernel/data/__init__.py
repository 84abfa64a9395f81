"""Images in: sources (Kaggle folders, plain folders, CSVs), robust decoding, and the decode loader."""
from kernel.data.decode import DecodeError, decode_image, decode_resized, resize_square
from kernel.data.loader import DecodeDataset, make_loader, to_model_input
from kernel.data.sources import (
    Record,
    csv_source,
    folder_source,
    kaggle_path,
    kaggle_split,
    open_source,
    parse_shard,
    shard,
)

__all__ = [
    "DecodeError", "decode_image", "decode_resized", "resize_square",
    "DecodeDataset", "make_loader", "to_model_input",
    "Record", "csv_source", "folder_source", "kaggle_path", "kaggle_split", "open_source", "parse_shard", "shard",
]
