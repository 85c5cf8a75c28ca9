"""Tiny Hugging Face transformers built from configs (no download): BERT, T5 and Llama.

Every model has ``hidden`` as its model width, ``hidden // head_dim`` attention heads, a feed-forward
size of ``4 * hidden`` and ``layers`` blocks (T5: ``layers`` encoder and ``layers`` decoder blocks).
Input embeddings and output heads are tied, as in the original models.
"""

from __future__ import annotations

ARCHS = ("encoder", "seq2seq", "decoder")

#: The output head(s) of each architecture (regexes on module names), kept in full precision by default.
#: BERT's whole MLM head (``cls.predictions``: transform + decoder) counts as its head.
HEADS: dict[str, tuple[str, ...]] = {
    "encoder": (r"^cls\.",),
    "seq2seq": (r"(^|\.)lm_head$",),
    "decoder": (r"(^|\.)lm_head$",),
}


def build_model(
    arch: str,
    vocab_size: int,
    hidden: int,
    layers: int,
    seq_len: int,
    head_dim: int = 32,
    dropout: float = 0.0,
    pad_id: int = 0,
    bos_id: int = 2,
    eos_id: int = 3,
):
    """A randomly initialised BertForMaskedLM ("encoder"), T5ForConditionalGeneration ("seq2seq") or
    LlamaForCausalLM ("decoder")."""
    import transformers as tf

    if hidden % head_dim:
        raise ValueError(f"hidden={hidden} is not a multiple of head_dim={head_dim}")
    heads = hidden // head_dim
    if arch == "encoder":
        cfg = tf.BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=seq_len, type_vocab_size=1,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=pad_id,
            tie_word_embeddings=True,
        )
        return tf.BertForMaskedLM(cfg)
    if arch == "seq2seq":
        cfg = tf.T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=head_dim, d_ff=4 * hidden, num_layers=layers,
            num_decoder_layers=layers, num_heads=heads, dropout_rate=dropout, feed_forward_proj="relu",
            pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id, tie_word_embeddings=True,
        )
        return tf.T5ForConditionalGeneration(cfg)
    if arch == "decoder":
        cfg = tf.LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
            max_position_embeddings=seq_len, attention_dropout=dropout, pad_token_id=pad_id,
            bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=True,
        )
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


def quantize_excludes(arch: str, quantize_heads: bool = False, exclude: list[str] | None = None) -> list[str]:
    """The ``exclude`` regexes for `tritium.quantize`: the arch's head (unless ``quantize_heads``) plus
    ``exclude``."""
    if arch not in HEADS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    return ([] if quantize_heads else list(HEADS[arch])) + list(exclude or [])
