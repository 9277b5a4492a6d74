#!/usr/bin/env python3
"""Generate kestrel's golden test fixtures (tiny random models + reference logits).

Regenerate with:
    pip install torch transformers safetensors gguf numpy tokenizers
    python scripts/make_fixtures.py

Writes tests/fixtures/ (see tests/fixtures/README.md for every convention).
Everything is seeded, so a rerun with the same library versions reproduces
the same bytes.  The last step re-reads every GGUF with gguf.GGUFReader and
runs an independent numpy forward pass from it; that pass is the executable
spec the Rust loader mirrors, and the script fails if it disagrees with the
HF goldens.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QT
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

SPECIALS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
VOCAB_TARGET = 480

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. A kestrel hovers above the field, "
    "watching the grass for the smallest movement before it dives.",
    "Inference engines load weights, tokenize the prompt, and run the transformer one "
    "token at a time. The key-value cache keeps every earlier position so the model "
    "never has to recompute the past.",
    "In 2024 there were 365 days plus one; 3.14159 is close to pi and 2.71828 to e. "
    "Call 555-0199 or write to hello@example.com before 09:30.",
    "Don't panic: it's fine, they're here, we'll see, I've done it, you'd know.",
    "Le café était très animé ; la façade naïve du théâtre brillait. "
    "Über den Wolken muß die Freiheit wohl grenzenlos sein. ¿Dónde está el niño?",
    "日本語のテキストも少し含めます。東京は大きな都市です。中文也有一点。한국어도 조금.",
    "Emoji appear too: 🦅 🚀 🔥 😀 👍🏽 and symbols like → ≤ ≥ ∑ √ π Ω.",
    "def main():\n    for i in range(10):\n        print(i * i)\n\nif __name__ == '__main__':\n    main()\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
]

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and trailing   ",
    "line one\nline two\n\n\nafter blank lines",
    "tabs\tand\r\nwindows newlines",
    "Café naïve façade über niño",
    "日本語のテキスト",
    "emoji 🦅🚀 and skin tone 👍🏽",
    "numbers 12345 678 3.14159 and 2024-01-31",
    "don't won't it's they're I'll we've",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "mixed CASE WoRdS ALLCAPS",
    "unseen chars: ∫ ℵ ẞ zebra-quokka",
    "a",
    "",
    "    def f(x):\n        return x  # comment",
]

# Tolerances the numpy check enforces; the README recommends the same ones for Rust.
F_TOL = 1e-3  # f32 / f16 / bf16 weights (goldens were computed from the rounded weights)
Q8_MAX_TOL = 0.5  # Q8_0 vs f32 golden: max |diff|
Q8_MEAN_TOL = 0.1  # Q8_0 vs f32 golden: mean |diff|
Q8_ARGMAX_MARGIN = 0.5  # Q8_0: argmax must agree where golden top1-top2 gap exceeds this

PROMPT = "The kestrel hovers over the field. Café 🦅!"
N_GREEDY = 8


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT * 3, trainer=trainer)
    # Llama-3 style: the tokenizer itself prepends <|bos|> when special tokens are requested.
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A",
        pair="<|bos|> $A <|bos|>:1 $B:1",
        special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))],
    )
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their llama.cpp token types, and merges as 'a b' strings."""
    data = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    n = len(vocab)
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    assert all(tokens), "token ids must be dense"
    special = {a["content"] for a in data["added_tokens"] if a["special"]}
    types = [int(gguf.TokenType.CONTROL) if t in special else int(gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


# --------------------------------------------------------------------------- architectures

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    attn_implementation="eager",
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

ARCHS = {
    "llama": dict(
        hf_class="LlamaForCausalLM",
        seed=1001, embed_std=0.5, final_norm_gain=1.0,
        st_dtype=torch.float32,
        gguf_dtype="f32",
        q8=True,
        layers=2,
        head_dim=32,
        tied=False,
        hub_rope={"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
    ),
    "qwen2": dict(
        hf_class="Qwen2ForCausalLM",
        seed=1007, embed_std=0.03, final_norm_gain=8.0,
        st_dtype=torch.bfloat16,
        gguf_dtype="bf16",
        q8=True,
        layers=2,
        head_dim=16,
        tied=True,
        hub_rope={"rope_theta": 1000000.0, "rope_scaling": None},
    ),
    "qwen3": dict(
        hf_class="Qwen3ForCausalLM",
        seed=1000, embed_std=0.5, final_norm_gain=1.0,
        st_dtype=torch.float16,
        gguf_dtype="f16",
        q8=False,
        layers=2,
        head_dim=32,
        tied=False,
        hub_rope={"rope_theta": 1000000.0, "rope_scaling": None},
    ),
    "gemma3": dict(
        hf_class="Gemma3ForCausalLM",
        seed=1001, embed_std=0.03, final_norm_gain=8.0,
        st_dtype=torch.float32,
        gguf_dtype="f32",
        q8=False,
        # llama.cpp hard-codes Gemma 3's pattern (every 6th layer global, SWA layers use
        # rope base 10000), so 6 layers is the smallest model whose GGUF means the same.
        layers=6,
        head_dim=32,
        kv_heads=1,  # like Gemma 3 270M (MQA); also keeps the 6-layer fixture small
        tied=True,
        hub_rope={"rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None},
    ),
}


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def make_config(arch: str, spec: dict, vocab_size: int):
    import transformers as tf

    kw = dict(COMMON, vocab_size=vocab_size, num_hidden_layers=spec["layers"], head_dim=spec["head_dim"],
              tie_word_embeddings=spec["tied"])
    if "kv_heads" in spec:
        kw["num_key_value_heads"] = spec["kv_heads"]
    if arch == "llama":
        kw["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=500000.0)
        return tf.LlamaConfig(**kw)
    if arch == "qwen2":
        kw.pop("head_dim")  # Qwen2 always uses hidden/heads
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        kw["use_sliding_window"] = False
        return tf.Qwen2Config(**kw)
    if arch == "qwen3":
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
        kw["use_sliding_window"] = False
        return tf.Qwen3Config(**kw)
    if arch == "gemma3":
        kw["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        kw["hidden_activation"] = "gelu_pytorch_tanh"
        kw["sliding_window"] = 4
        kw["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                             for i in range(spec["layers"])]
        # llama.cpp (non-27B Gemma 3) scales scores by 1/sqrt(head_dim) and has no GGUF key
        # for this, so the fixture keeps query_pre_attn_scalar == head_dim like real 270M-12B.
        kw["query_pre_attn_scalar"] = spec["head_dim"]
        kw["final_logit_softcapping"] = None
        kw["attn_logit_softcapping"] = None
        return tf.Gemma3TextConfig(**kw)
    raise ValueError(arch)


def init_weights(model: torch.nn.Module, arch: str, spec: dict) -> None:
    """Large, varied weights so that a wrong implementation shows in the logits.

    Tied-embedding models get a small embedding (otherwise the residual stream is mostly the
    current token's embedding and greedy decoding just repeats it) and a larger final-norm
    gain to bring the logits back to a spread of a few units.  Seeds were picked so that the
    greedy continuation is varied and no greedy step is a near tie.
    """
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            r = torch.randn(shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                # Gemma RMSNorm multiplies by (1 + w): store the offset, others store the gain.
                val = 0.25 * r if arch == "gemma3" else 1.0 + 0.25 * r
            elif name.endswith(".bias"):
                val = 0.5 * r
            elif "embed_tokens" in name:
                val = spec["embed_std"] * r
            else:
                val = 1.2 * r / math.sqrt(shape[1])
            if name == "model.norm.weight":
                gain = spec["final_norm_gain"]
                val = gain * (1.0 + val) - 1.0 if arch == "gemma3" else gain * val
            p.copy_(val)


def round_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every weight to the storage dtype, keep computing in f32."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


def hub_style_config(cfg_dict: dict, spec: dict, st_dtype: torch.dtype) -> dict:
    """Rewrite transformers-5 'rope_parameters' into the keys real Hub checkpoints use."""
    d = {k: v for k, v in cfg_dict.items() if k not in ("rope_parameters", "transformers_version")}
    d.update(spec["hub_rope"])
    d["torch_dtype"] = str(st_dtype).replace("torch.", "")
    d.pop("dtype", None)
    return dict(sorted(d.items()))


def full_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy ids plus the smallest top1-top2 logit gap met on the way (tie safety margin)."""
    seq, gap = list(ids), math.inf
    for _ in range(n):
        last = full_logits(model, seq)[-1]
        top2 = np.sort(last)[-2:]
        gap = min(gap, float(top2[1] - top2[0]))
        seq.append(int(last.argmax()))
    return seq[len(ids):], gap


def r6(x: float) -> float:
    return float(f"{x:.6g}")


# --------------------------------------------------------------------------- GGUF writing


def permute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (as convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta: float, dim: int, s: dict) -> np.ndarray:
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old = s["original_max_position_embeddings"]
    lo_w, hi_w = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_w:
            out.append(1.0)
        elif wl > lo_w:
            out.append(s["factor"])
        else:
            sm = (old / wl - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1.0 / ((1 - sm) / s["factor"] + sm))
    return np.array(out, dtype=np.float32)


HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(arch: str, sd: dict[str, np.ndarray], cfg) -> list[tuple[str, np.ndarray]]:
    out: list[tuple[str, np.ndarray]] = []
    norm_shift = 1.0 if arch == "gemma3" else 0.0
    for name in sorted(sd, key=_hf_order):
        w = sd[name]
        if name == "model.embed_tokens.weight":
            out.append(("token_embd.weight", w))
            continue
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out.append(("output.weight", w))
            continue
        if name == "model.norm.weight":
            out.append(("output_norm.weight", w + norm_shift))
            continue
        parts = name.split(".")
        bid, rest = int(parts[2]), ".".join(parts[3:])
        if arch == "gemma3":
            gemma_names = {
                "post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
            }
            g = gemma_names.get(rest) or HF_TO_GGUF[rest]
        else:
            g = {"post_attention_layernorm.weight": "ffn_norm.weight"}.get(rest) or HF_TO_GGUF[rest]
        if arch == "llama" and rest == "self_attn.q_proj.weight":
            w = permute_llama(w, cfg.num_attention_heads)
        if arch == "llama" and rest == "self_attn.k_proj.weight":
            w = permute_llama(w, cfg.num_key_value_heads)
        if g.endswith("norm.weight"):
            w = w + norm_shift
        out.append((f"blk.{bid}.{g}", w))
    if arch == "llama":
        out.insert(0, ("rope_freqs.weight", llama3_rope_factors(500000.0, head_dim_of(cfg), LLAMA3_SCALING)))
    return out


def _hf_order(name: str):
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return (1, int(parts[2]), ".".join(parts[3:]))
    return (0 if "embed" in name else 2, 0, name)


def write_gguf(path: Path, arch: str, cfg, tensors, tok: Tokenizer, wtype: str) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_custom_alignment(gguf.GGUF_DEFAULT_ALIGNMENT)
    w.add_name(f"kestrel-fixture-{arch}")
    head_dim = head_dim_of(cfg)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[wtype]
    w.add_file_type(ftype)
    if wtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = gguf_vocab(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.token_to_id("<|bos|>"))
    w.add_eos_token_id(tok.token_to_id("<|eos|>"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    for name, t in tensors:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or wtype == "f32":
            w.add_tensor(name, t)  # 1-D tensors (norms, biases, rope_freqs) always stay F32
        elif wtype == "f16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            qt = {"bf16": QT.BF16, "q8_0": QT.Q8_0}[wtype]
            w.add_tensor(name, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- numpy reference from GGUF


class GgufModel:
    """Independent forward pass that reads ONLY the GGUF file (the loader spec)."""

    def __init__(self, path: Path):
        r = gguf.GGUFReader(str(path))
        self.kv = {k: f.contents() for k, f in r.fields.items()}
        self.arch = self.kv["general.architecture"]
        a = self.arch
        self.n_layer = self.kv[f"{a}.block_count"]
        self.n_embd = self.kv[f"{a}.embedding_length"]
        self.n_head = self.kv[f"{a}.attention.head_count"]
        self.n_kv = self.kv[f"{a}.attention.head_count_kv"]
        self.head_dim = self.kv.get(f"{a}.attention.key_length", self.n_embd // self.n_head)
        self.eps = self.kv[f"{a}.attention.layer_norm_rms_epsilon"]
        self.base = self.kv[f"{a}.rope.freq_base"]
        self.rope_dim = self.kv.get(f"{a}.rope.dimension_count", self.head_dim)
        self.swa = self.kv.get(f"{a}.attention.sliding_window")
        self.t: dict[str, np.ndarray] = {}
        for t in r.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            # GGUF shape is [ne0 (inner/in), ne1 (out)]; numpy row-major is (out, in).
            self.t[t.name] = np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        self.types = {t.name: t.tensor_type.name for t in r.tensors}

    def rms(self, x, w):
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos, base, factors):
        # x: (seq, heads, head_dim). llama (NORM mode) rotates adjacent pairs (2i, 2i+1) because
        # the converter permuted q/k rows; qwen2/qwen3/gemma3 (NEOX mode) rotate (i, i + d/2).
        d = self.rope_dim
        inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if factors is not None:
            inv = inv / factors
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = x.astype(np.float64).copy()
        if self.arch == "llama":
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        else:
            a, b = x[..., : d // 2], x[..., d // 2: d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2: d] = a * sin + b * cos
        return out

    def forward(self, ids: list[int]) -> np.ndarray:
        t, a = self.t, self.arch
        n = len(ids)
        pos = np.arange(n)
        x = t["token_embd.weight"][ids].astype(np.float64)
        if a == "gemma3":
            x = x * math.sqrt(self.n_embd)  # embedding scale is applied at run time, not baked
        factors = t.get("rope_freqs.weight")
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv
        for il in range(self.n_layer):
            p = f"blk.{il}."

            def lin(name, h):
                y = h @ t[p + name + ".weight"].T.astype(np.float64)
                if p + name + ".bias" in t:
                    y = y + t[p + name + ".bias"]
                return y

            h = self.rms(x, t[p + "attn_norm.weight"])
            q = lin("attn_q", h).reshape(n, nh, hd)
            k = lin("attn_k", h).reshape(n, nkv, hd)
            v = lin("attn_v", h).reshape(n, nkv, hd)
            if p + "attn_q_norm.weight" in t:
                q = self.rms(q, t[p + "attn_q_norm.weight"])
                k = self.rms(k, t[p + "attn_k_norm.weight"])
            # Gemma 3 in llama.cpp: every 6th layer is global (rope.freq_base), the rest are
            # sliding-window layers with a fixed rope base of 10000.
            is_swa = a == "gemma3" and (il + 1) % 6 != 0
            base = 10000.0 if is_swa else self.base
            q = self.rope(q, pos, base, factors)
            k = self.rope(k, pos, base, factors)
            rep = nh // nkv
            k = np.repeat(k, rep, axis=1)  # query head h uses kv head h // rep
            v = np.repeat(v, rep, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            qi, ki = pos[:, None], pos[None, :]
            mask = ki > qi
            if is_swa:
                mask |= (qi - ki) >= self.swa
            s = np.where(mask[None], -np.inf, s)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", s, v).reshape(n, nh * hd)
            o = lin("attn_output", o)
            if a == "gemma3":
                o = self.rms(o, t[p + "post_attention_norm.weight"])
            x = x + o
            h = self.rms(x, t[p + "ffn_norm.weight"])
            gate, up = lin("ffn_gate", h), lin("ffn_up", h)
            if a == "gemma3":
                act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
            else:
                act = gate / (1 + np.exp(-gate))
            f = lin("ffn_down", act * up)
            if a == "gemma3":
                f = self.rms(f, t[p + "post_ffw_norm.weight"])
            x = x + f
        x = self.rms(x, t["output_norm.weight"])
        head = t.get("output.weight", t["token_embd.weight"])
        return (x @ head.T.astype(np.float64)).astype(np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(self.forward(seq)[-1].argmax()))
        return seq[len(ids):]


def check_gguf_tokenizer(kv: dict, cases: list[dict]) -> None:
    """Rebuild a byte-level BPE from tokenizer.ggml.* alone; it must reproduce the goldens."""
    tokens, types, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"], kv["tokenizer.ggml.merges"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == int(gguf.TokenType.CONTROL)])
    for c in cases:
        got = tok.encode(c["text"], add_special_tokens=False).ids
        assert got == c["ids"], ("GGUF tokenizer", c, got)


# --------------------------------------------------------------------------- main


def main() -> int:
    import transformers as tf

    torch.manual_seed(0)
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    tf.logging.set_verbosity_error()

    for sub in list(ARCHS) + ["tokenizer"]:
        shutil.rmtree(OUT / sub, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer
    tok = build_tokenizer()
    tok_dir = OUT / "tokenizer"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
    cases = [{"text": s, "ids": tok.encode(s, add_special_tokens=False).ids} for s in TOKENIZER_CASES]
    for c in cases:
        assert tok.decode(c["ids"], skip_special_tokens=False) == c["text"], c
    note = ("ids = HF tokenizers encode(text, add_special_tokens=False); special-token text is "
            "matched as a single token (parse_special). decode(ids) == text for every case.")
    (OUT / "tokenizer_golden.json").write_text(
        "{\n" + f' "note": {json.dumps(note)},\n "vocab_size": {tok.get_vocab_size()},\n "cases": [\n'
        + ",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in cases) + "\n ]\n}\n")
    hf_tok = tf.AutoTokenizer.from_pretrained(str(tok_dir))
    for c in cases:
        assert hf_tok.encode(c["text"], add_special_tokens=False) == c["ids"], ("AutoTokenizer", c)
    vocab_size = tok.get_vocab_size()
    prompt_ids = tok.encode(PROMPT).ids
    assert prompt_ids == hf_tok.encode(PROMPT), "AutoTokenizer must add <|bos|> the same way"
    print(f"tokenizer: vocab {vocab_size}, prompt {len(prompt_ids)} tokens")

    report = []
    for ai, (arch, spec) in enumerate(ARCHS.items()):
        d = OUT / arch
        hf_dir = d / "hf"
        hf_dir.mkdir(parents=True)
        cfg = make_config(arch, spec, vocab_size)
        torch.manual_seed(1000 + ai)
        model = getattr(tf, spec["hf_class"])(cfg).eval()
        init_weights(model, arch, spec)
        round_to(model, spec["st_dtype"])
        model.eval()

        logits = full_logits(model, prompt_ids)
        greedy_ids, greedy_gap = greedy(model, prompt_ids, N_GREEDY)
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=N_GREEDY, do_sample=False,
                                 eos_token_id=None, pad_token_id=1)
        gen_ids = gen[0, len(prompt_ids):].tolist()
        assert gen_ids == greedy_ids, (arch, gen_ids, greedy_ids)

        # ---- HF checkpoint (weights stored in the storage dtype; goldens came from these values)
        sd32 = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            sd32.pop("lm_head.weight", None)
        save_file({k: v.to(spec["st_dtype"]) for k, v in sd32.items()}, str(hf_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        (hf_dir / "config.json").write_text(json.dumps(
            hub_style_config(cfg.to_dict(), spec, spec["st_dtype"]) | {"architectures": [spec["hf_class"]]},
            indent=2) + "\n")
        gen_cfg = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
        (hf_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        shutil.copy(tok_dir / "tokenizer.json", hf_dir / "tokenizer.json")
        shutil.copy(tok_dir / "tokenizer_config.json", hf_dir / "tokenizer_config.json")

        # The hub-style config.json + safetensors must reload to exactly the same model.
        reloaded = tf.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
        rl = full_logits(reloaded, prompt_ids)
        reload_diff = float(np.abs(rl - logits).max())
        assert reload_diff < 1e-5, (arch, "reload", reload_diff)

        # How much the arch-specific features move the logits (proves the fixture catches them).
        sensitivity = {}
        if arch == "llama":
            cfg2 = make_config(arch, spec, vocab_size)
            cfg2.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
            m2 = tf.LlamaForCausalLM(cfg2).eval()
            m2.load_state_dict(model.state_dict())
            sensitivity["without_llama3_rope_scaling"] = float(np.abs(full_logits(m2, prompt_ids) - logits).max())
        if arch == "gemma3":
            cfg2 = make_config(arch, spec, vocab_size)
            cfg2.sliding_window = 256
            m2 = tf.Gemma3ForCausalLM(cfg2).eval()
            m2.load_state_dict(model.state_dict())
            sensitivity["without_sliding_window"] = float(np.abs(full_logits(m2, prompt_ids) - logits).max())
            cfg3 = make_config(arch, spec, vocab_size)
            cfg3.rope_parameters["sliding_attention"]["rope_theta"] = 1000000.0
            m3 = tf.Gemma3ForCausalLM(cfg3).eval()
            m3.load_state_dict(model.state_dict())
            sensitivity["local_rope_base_1e6_instead_of_1e4"] = float(
                np.abs(full_logits(m3, prompt_ids) - logits).max())

        # ---- GGUF files
        sdnp = {k: v.float().numpy() for k, v in sd32.items()}
        tensors = gguf_tensors(arch, sdnp, cfg)
        gguf_files = {f"model-{spec['gguf_dtype']}.gguf": spec["gguf_dtype"]}
        if spec["q8"]:
            gguf_files["model-q8_0.gguf"] = "q8_0"
        for fname, wtype in gguf_files.items():
            write_gguf(d / fname, arch, cfg, tensors, tok, wtype)

        summary = {
            "architecture": arch,
            "hf_class": spec["hf_class"],
            "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": head_dim_of(cfg),
            "rms_norm_eps": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            **spec["hub_rope"],
        }
        if arch == "gemma3":
            summary |= {"sliding_window": cfg.sliding_window, "layer_types": cfg.layer_types,
                        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
                        "hidden_activation": cfg.hidden_activation, "embed_scale": math.sqrt(cfg.hidden_size)}
        golden = {
            "text": PROMPT,
            "tokens": prompt_ids,
            "dtype": str(spec["st_dtype"]).replace("torch.", ""),
            "tolerance_note": (
                "logits are HF transformers float32 eager outputs computed from the weights AFTER "
                "rounding to the stored dtype, so safetensors and the f32/f16/bf16 GGUF encode exactly "
                "these weights: compare with max |diff| <= 1e-3. model-q8_0.gguf: compare against "
                "golden_q8_0.json (1e-3 with f32 activations) and against these logits with max |diff| "
                "<= 0.5, mean |diff| <= 0.1, and identical argmax at every position whose top1-top2 "
                "gap here exceeds 0.5."),
            "greedy": greedy_ids,
            "greedy_note": "argmax continuation of `tokens`, 8 steps, not stopping at eos; "
                           "greedy_min_top2_gap is the smallest top1-top2 logit margin on the way",
            "greedy_min_top2_gap": r6(greedy_gap),
            "config_summary": summary,
            "sensitivity_max_abs_logit_change": sensitivity,
            "logits": [[r6(x) for x in row] for row in logits.tolist()],
        }
        (d / "golden.json").write_text(json.dumps(golden, separators=(",", ":")) + "\n")
        report.append((arch, d, gguf_files, logits, greedy_ids, reload_diff, sensitivity))

    # ---- verification: independent numpy forward from every GGUF
    print("\nnumpy-from-GGUF check (max |logit diff| vs HF golden):")
    ok = True
    for arch, d, gguf_files, logits, greedy_ids, reload_diff, sensitivity in report:
        print(f"  {arch}: HF reload diff {reload_diff:.2e}; sensitivity {sensitivity}")
        for fname, wtype in gguf_files.items():
            gm = GgufModel(d / fname)
            # tokenizer metadata must reproduce the token list in id order
            toks = gm.kv["tokenizer.ggml.tokens"]
            assert len(toks) == len(logits[0])
            if fname.startswith("model-") and wtype != "q8_0":
                check_gguf_tokenizer(gm.kv, cases)
            np_logits = gm.forward(prompt_ids)
            diff = float(np.abs(np_logits - logits).max())
            same_argmax = bool((np_logits.argmax(-1) == logits.argmax(-1)).all())
            g = gm.greedy(prompt_ids, N_GREEDY)
            extra = ""
            if wtype != "q8_0":
                good = diff < F_TOL and same_argmax and g == greedy_ids
            else:
                # Q8_0 weights move logits by a few percent: bound max/mean error and demand
                # the same argmax wherever the f32 winner leads by a clear margin.
                top2 = np.sort(logits, -1)[:, -2:]
                clear = (top2[:, 1] - top2[:, 0]) > Q8_ARGMAX_MARGIN
                clear_same = bool((np_logits.argmax(-1) == logits.argmax(-1))[clear].all())
                mean = float(np.abs(np_logits - logits).mean())
                good = diff < Q8_MAX_TOL and mean < Q8_MEAN_TOL and clear_same
                extra = (f"\n    {'':18s} mean diff {mean:.3e}; argmax equal where margin > "
                         f"{Q8_ARGMAX_MARGIN}: {clear_same} ({int(clear.sum())}/{len(clear)} positions)")
            ok &= good
            print(f"    {fname:18s} max diff {diff:.3e}  argmax-equal {same_argmax}  greedy {g == greedy_ids}"
                  f"  {'OK' if good else 'FAIL'}{extra}")
            if wtype == "q8_0":
                (d / "golden_q8_0.json").write_text(json.dumps({
                    "tokens": prompt_ids,
                    "note": "f64 numpy forward of model-q8_0.gguf with weights dequantized from Q8_0 and "
                            "f32/f64 activations (no activation quantization). Rust with f32 activations "
                            "should match within 1e-3; with Q8_0-quantized activations (llama.cpp "
                            "vec_dot_q8_0_q8_0 style) use the looser bound vs golden.json.",
                    "max_abs_diff_vs_golden_json": diff,
                    "greedy": g,
                    "logits": [[r6(x) for x in row] for row in np_logits.tolist()],
                }, separators=(",", ":")) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"\nfixtures total size: {total / 1e6:.2f} MB")
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
