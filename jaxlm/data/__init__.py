"""Data layer: tokenizers (SentencePiece, Hugging Face tokenizer.json), document sources, and the
packed grain pipeline."""

from jaxlm.data.hf_tokenizer import HFTokenizer
from jaxlm.data.pipeline import eval_batches, make_train_iterator, packed_rows
from jaxlm.data.sources import SHAKESPEARE_EVAL_PLAYS, documents
from jaxlm.data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "HFTokenizer", "SHAKESPEARE_EVAL_PLAYS", "Tokenizer", "documents", "eval_batches",
    "get_tokenizer", "load_tokenizer", "make_train_iterator", "packed_rows", "train_tokenizer",
]
