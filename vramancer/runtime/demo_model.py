"""The demo's model, made here with no download: a Llama of about 26M parameters with random
weights and a real byte-level BPE tokenizer (with a chat template) trained on a few paragraphs of
built-in text, saved as a transformers folder (config.json, model.safetensors, tokenizer files)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["DEMO_VERSION", "DEMO_CONFIG", "demo_model_folder", "build_demo_model", "build_demo_tokenizer"]

DEMO_VERSION = 1
DEMO_CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                   tie_word_embeddings=False)
_VOCAB = 1024
_SEED = 1234
_SPECIAL = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TEXT = """\
A model that does not fit one graphics card can still run when its layers are shared out over every
card a person owns. The first card holds the embeddings and the first layers, the next card the
layers after them, and the last card the final norm and the language model head. Between two cards
only the hidden states travel, a few kilobytes for each token, so the split costs little time.
Each layer keeps its own key and value cache beside it on the same card. When the cards together are
still too small, some layers stay in host memory and are copied to a card just before they run, while
the next layer is already on its way, and the rest can even be read from disk. A plan says where
every block goes before anything is loaded: the weights, the cache for the whole context, the
workspace for a chunk of the prompt, and a reserve for the driver. After loading, the memory each
stage measures is shown next to what the plan said, so that nobody has to guess where the memory went.
Old cards and new cards, small cards and large cards, all of them can help. The tokens per second of
the whole pipeline depend on the slowest stage and on how fast the hidden states move between cards.
"""


def demo_model_folder(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"demo-llama-v{DEMO_VERSION}"


def build_demo_tokenizer():
    """A byte-level BPE trained on the built-in text, as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=DEMO_CONFIG["max_position_embeddings"])


def build_demo_model(cache_dir: str | Path) -> Path:
    """The demo folder under ``cache_dir``, made if missing or incomplete; returns its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = demo_model_folder(cache_dir)
    marker = folder / "vramancer-demo.json"
    if marker.is_file() and (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = build_demo_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **DEMO_CONFIG)
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a wider spread than the default init: greedy choices are decisive
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "vramancer-demo.json").write_text(json.dumps({"version": DEMO_VERSION, "seed": _SEED}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
