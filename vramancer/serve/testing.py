"""Tiny random chat models built offline, for the server's tests and benchmark.

``build_tiny_chat_model(folder)`` trains a byte-level BPE tokenizer on a few sentences
(any text round-trips through it), gives it a chat template and special tokens, builds a
Llama-architecture model with random weights from a config class, and saves both with
``save_pretrained``, so the folder loads like any checkpoint. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_tokenizer", "build_tiny_chat_model"]

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# role header, content, end marker; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the GPU splits the model.",
    "VRAM is the memory of a graphics card; a large model needs more than one card.",
    "Pipeline stages pass hidden states from one device to the next, token by token.",
    "Hello! How are you today? I am fine, thank you. What is the weather like?",
    "Once upon a time there was a small language model that lived on two GPUs.",
    "0123456789 + - * / = ( ) [ ] { } < > ; : , . ! ? ' \" @ # $ % ^ & _ ~",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast: byte-level BPE (every string encodes, none is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_chat_model(folder: str | Path, hidden_size: int = 64, num_layers: int = 4,
                          num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                          max_position_embeddings: int = 2048, seed: int = 0,
                          dtype: str = "float32") -> Path:
    """Save a random Llama-architecture chat model and its tokenizer into ``folder``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
