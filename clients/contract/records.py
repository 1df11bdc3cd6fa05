"""The record-level example layout both data sources and the training code share.

One record (a speech, a row of an institution's file) yields at most one example: a row of a
``[N, block_len]`` LongTensor holding its first ``block_len`` token ids, right-padded with
:data:`PAD_ID`. The padding is not a token: the model sees a real id in its place (after the
record's tokens, so a causal model's outputs at the record's positions do not change) and the
loss, accuracy and token counts skip it.
"""

PAD_ID = -100
"""Padding in an example row; also PyTorch's default ``ignore_index`` for cross-entropy."""
