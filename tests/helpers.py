"""Helpers shared by the test files (tests/ is on sys.path under pytest)."""

import contextlib
import os
import signal
from pathlib import Path

#: The shared data folder beside the checkout (or $TRITIUM_DATA) and its tiny-shakespeare copy.
SHARED = Path(os.environ.get("TRITIUM_DATA", Path(__file__).parents[2] / "shared" / "data"))
SHAKESPEARE = SHARED / "lm" / "tinyshakespeare.txt"


@contextlib.contextmanager
def deadline(seconds: int, error: type[BaseException] = TimeoutError):
    """Fail instead of hanging: raise ``error`` if the block runs longer than ``seconds``."""

    def boom(*_):
        raise error(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def shakespeare_text() -> str:
    """tiny-shakespeare's text, or a skip naming the missing file."""
    import pytest

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the shared tiny-shakespeare copy; set TRITIUM_DATA)")
    return SHAKESPEARE.read_text(encoding="utf-8")


def decoder_archs() -> dict:
    """transformers' decoder (config class, model class) pairs that the GGUF and HF BitNet tests cover."""
    import transformers as tf

    return {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "bitnet": (tf.BitNetConfig, tf.BitNetForCausalLM)}


def random_decoder(arch: str, seed: int = 0, **config):
    """A random decoder of ``arch`` (a key of `decoder_archs`) in eval mode, its norm weights drawn in
    [0.5, 1.5) and its biases in [-0.5, 0.5), so that a misplaced tensor shows."""
    import torch

    conf_cls, model_cls = decoder_archs()[arch]
    torch.manual_seed(seed)
    model = model_cls(conf_cls(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand_like(p) + (0.5 if name.endswith("norm.weight") else -0.5))
    return model


def train_bpe(text: str, vocab: int):
    """A byte-level BPE (GPT-2 style) trained on ``text``, with one special token, id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok
