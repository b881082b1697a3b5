"""Data: the embedded procedural corpus, tokenizers, and packed pre-training sequences."""

from ntp_rl.data.corpus import (
    SPLITS,
    Problem,
    extract_answer,
    generate_problem,
    is_correct,
    iter_problems,
    sample_documents,
    sample_problems,
    split_of,
)
from ntp_rl.data.pretrain import (
    PackedSequences,
    PretrainData,
    SequenceSource,
    StreamingSequences,
    build_pretrain_data,
)
from ntp_rl.data.tokenizer import load_tokenizer, train_embedded_tokenizer

__all__ = [
    "SPLITS",
    "PackedSequences",
    "PretrainData",
    "Problem",
    "SequenceSource",
    "StreamingSequences",
    "build_pretrain_data",
    "extract_answer",
    "generate_problem",
    "is_correct",
    "iter_problems",
    "load_tokenizer",
    "sample_documents",
    "sample_problems",
    "split_of",
    "train_embedded_tokenizer",
]
