"""Training data: files → formatted, tokenized, masked examples → packed or padded batches.

    ds = minitrain.load_dataset([("a.jsonl", 0.7), ("b.csv", 0.3)], tok, max_seq_length=2048, eval_split=0.05)
    print(ds.summary())
    loader = ds.train_batches(batch_size=2, packing=True)   # resumable: loader.state_dict()/load_state_dict()
    for batch in loader: ...   # input_ids, labels, position_ids, cu_seqlens/max_seqlen or attention_mask, n_items

Modules: ``sources`` (reading files, streamed), ``formats`` (detection, normalization), ``encode`` (chat
template, assistant spans, batch tokenization), ``batching`` (packing, padding, resumable batches),
``dataset`` (``load_dataset`` and ``Dataset``: mixing, splits, summary).
"""
from .batching import Batches, collate_packed, collate_padded, packed_attention_mask
from .dataset import Dataset, SourceInfo, load_dataset
from .encode import Encoder, find_backend
from .formats import FORMATS, detect_format, normalize
from .sources import DataError, read_records

__all__ = ["Batches", "DataError", "Dataset", "Encoder", "FORMATS", "SourceInfo", "collate_packed", "collate_padded",
           "detect_format", "find_backend", "load_dataset", "normalize", "packed_attention_mask", "read_records"]
