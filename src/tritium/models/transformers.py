"""Tiny Hugging Face transformers built from configs (no download): BERT, T5 and Llama.

Every model has ``hidden`` as its model width, ``hidden // head_dim`` attention heads, a feed-forward
size of ``4 * hidden`` and ``layers`` blocks (T5: ``layers`` encoder and ``layers`` decoder blocks).
Input embeddings and output heads are tied, as in the original models. `from_config` rebuilds a saved
file's model from its stored class name (one of `MODEL_CLASSES`) and config.
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


def masked_positions_only(model):
    """Make a ``BertForMaskedLM`` compute its MLM head only at the labelled positions (``labels != -100``) when
    called with ``labels=``: the loss is the same cross-entropy over the same positions, without the
    vocabulary-sized logits of the ~85% unlabelled ones (most of a small encoder's compute); the returned
    ``logits`` are then those of the labelled positions only, ``(n, vocab)``. Calls without labels are
    unchanged. Forward pre-hooks, so the module tree and its state dict stay transformers' own. Returns
    ``model``."""
    selected: dict = {}

    def take_labels(module, args, kwargs):
        labels = kwargs.get("labels")
        selected["mask"] = None if labels is None else labels != -100
        if labels is None:
            return None
        return args, {**kwargs, "labels": labels[selected["mask"]]}

    def select_rows(module, args):
        mask = selected.get("mask")
        return None if mask is None else (args[0][mask], *args[1:])

    model.register_forward_pre_hook(take_labels, with_kwargs=True)
    model.cls.register_forward_pre_hook(select_rows)
    return model


def quantize_excludes(arch: str, quantize_heads: bool = False, exclude: list[str] | None = None) -> list[str]:
    """The ``exclude`` regexes for `tritium.quantize`: the arch's head (unless ``quantize_heads``) plus
    ``exclude``."""
    if arch not in HEADS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
    return ([] if quantize_heads else list(HEADS[arch])) + list(exclude or [])


#: The transformers model classes a saved file may name as its ``model_class`` to be rebuilt from its stored
#: config (`from_config`); each is looked up by name in ``transformers``, nothing else is ever imported.
MODEL_CLASSES = (
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GPTJForCausalLM", "OPTForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "GraniteForCausalLM", "StableLmForCausalLM", "SmolLM3ForCausalLM", "BitNetForCausalLM",
    "T5ForConditionalGeneration", "BertForMaskedLM",
)
#: Config keys dropped before a stored config is built: they select code paths (attention kernels fetched
#: from the Hub, remote code, quantization back-ends) rather than describe the architecture.
_DROPPED_KEYS = ("auto_map", "attn_implementation", "experts_implementation", "quantization_config",
                 "kernel_config", "name_or_path")


def _counts(d: object, key: str = ""):
    """(key, value) of every integer whose key names a count of layers or experts, nested configs included."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _counts(v, str(k))
    elif isinstance(d, int) and not isinstance(d, bool):
        k = key.lower()
        if k.endswith(("layers", "layer", "experts")):
            yield key, d


def from_config(model_class: str, model_config: dict, max_blocks: int | None = None, device: str = "meta"):
    """A ``model_class`` model (one of `MODEL_CLASSES`) built from a config dict on ``device`` (meta: no
    memory for its weights).

    ``max_blocks`` bounds every layer or expert count of the config (a file's number of stored tensors:
    each block stores at least one), so that a hostile config cannot make building the skeleton take
    unbounded time. Raises ValueError for a class outside the allow-list or a config it rejects.
    """
    import torch
    import transformers

    if model_class not in MODEL_CLASSES:
        raise ValueError(f"model class {model_class!r} is not one tritium rebuilds from a stored config; "
                         f"supported: {', '.join(MODEL_CLASSES)}")
    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise ValueError(f"model class {model_class!r} is not in the installed transformers "
                         f"{transformers.__version__}; upgrade transformers")
    config_class = cls.config_class
    model_type = model_config.get("model_type")
    if model_type is not None and model_type != config_class.model_type:
        raise ValueError(f"model_config has model_type {model_type!r}, {model_class} expects "
                         f"{config_class.model_type!r}")
    for key, n in _counts(model_config):
        if n < 0 or (max_blocks is not None and n > max_blocks):
            raise ValueError(f"model_config {key} = {n} does not fit the file ({max_blocks} stored tensors)")
    config = {k: v for k, v in model_config.items() if not k.startswith("_") and k not in _DROPPED_KEYS}
    try:
        cfg = config_class.from_dict(config)
        with torch.device(device):
            return cls(cfg)
    except Exception as e:  # any failure of transformers' own config or model checks
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"cannot build {model_class} from the stored config: {reason}") from None
