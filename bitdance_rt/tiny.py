"""Tiny random-weight checkpoints in exactly the released layout (``bitdance-export make-tiny``).

They keep every structural feature of the real model (Qwen3 with GQA and q/k norms, the
diffusion head with shared adaLN, a 5-level autoencoder with 16x downsampling, the projector, a
tokenizer with every special token) at a size that runs in seconds on a CPU, and they open with
Hugging Face transformers so the authors' pipeline can run on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import BitDanceError
from .files import check_room, staged_directory
from .limits import MAX_SEED
from .spec import TINY_VOCAB, ModelSpec, preset_mid, preset_tiny

SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    + [f"<|res_{k}|>" for k in range(1, 257)]
    + [f"<|query_{k}|>" for k in range(1, 64)]
)
SUPPORTED_PARALLEL = (4, 16, 64)


def build_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer (Qwen's pre-tokenization, no merges) with the special tokens.

    Writes ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json`` and ``merges.txt``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # The Qwen2/3 split pattern, then byte-level mapping.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if tok.get_vocab_size() > TINY_VOCAB:
        raise BitDanceError("tiny tokenizer outgrew TINY_VOCAB")
    tok.save(str(out_dir / "tokenizer.json"))

    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n")


@torch.no_grad()
def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Deterministic random weights that keep activations O(1) through every layer.

    Values are drawn on the generator's device (a CUDA generator fills a 14B model quickly).
    """
    def randn(shape):
        return torch.randn(shape, generator=gen, device=gen.device)

    for name, p in module.named_parameters():
        shape = p.shape
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = randn(shape) * 0.02
        elif p.dim() == 1:  # norm weights
            value = 1.0 + 0.1 * randn(shape)
        elif "embed_tokens" in name:
            value = randn(shape)
        else:
            value = randn(shape) / p[0].numel() ** 0.5
        p.copy_(value.to(p.dtype))


SIZES = ("tiny", "mid")
# about the most a checkpoint of each size takes on disk (checked before it is made)
TINY_BYTES = {"tiny": 32 << 20, "mid": 400 << 20}


def make_tiny(out_dir, parallel_num: int = 4, seed: int = 0, gan_decoder: bool = False,
              size: str = "tiny", overwrite: bool = False) -> Path:
    """Write a complete random-weight checkpoint (float32) to ``out_dir``; returns the path.

    ``size`` "tiny" (15 MB, for tests) or "mid" (the CPU benchmark preset, about 150 MB). The
    directory is built aside and moved into place when complete; an existing file or non-empty
    directory is refused unless ``overwrite``."""
    if parallel_num not in SUPPORTED_PARALLEL:
        raise BitDanceError(
            f"--parallel-num must be one of {list(SUPPORTED_PARALLEL)}, got {parallel_num}")
    if size not in SIZES:
        raise BitDanceError(f"--size must be one of {list(SIZES)}, got {size!r}")
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
        raise BitDanceError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BitDanceError(f"{out} is a file; make-tiny writes a checkpoint directory: choose "
                            "a new directory name")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BitDanceError(f"{out} already exists and is not empty; choose a new directory "
                            "(make-tiny does not write over files)")
    check_room({out: TINY_BYTES[size]}, str(out), files=False)
    replace = (lambda old, writes: {p.name for p in old.iterdir()}) if overwrite else None
    with staged_directory(out, replace, "checkpoint") as stage:
        _write_tiny(stage, parallel_num, seed, gan_decoder, size)
    return out


def _write_tiny(out: Path, parallel_num: int, seed: int, gan_decoder: bool, size: str) -> None:
    from safetensors.torch import save_file

    from .models.autoencoder import BinaryAutoencoder
    from .models.head import DiffusionHead
    from .models.projector import Projector
    from .models.qwen3 import Qwen3ForCausalLM

    spec = (preset_tiny if size == "tiny" else preset_mid)(parallel_num)
    ae_cfg = spec.ae.__class__(**{**spec.ae.__dict__, "gan_decoder": gan_decoder})
    gen = torch.Generator().manual_seed(seed)

    llm = Qwen3ForCausalLM(spec.llm)
    head = DiffusionHead(spec.head)
    ae = BinaryAutoencoder(ae_cfg)
    proj = Projector(ae_cfg.z_channels, spec.llm.hidden_size)
    for m in (llm, head, ae, proj):
        randomize_(m, gen)
    with torch.no_grad():  # a less saturated output keeps tiny images in the uint8 range
        ae.decoder.conv_out.weight.mul_(0.3)

    def save(module: nn.Module, name: str):
        tensors = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})

    (out / "config.json").write_text(json.dumps(spec.llm.to_hf_dict(), indent=2))
    save(llm, "model.safetensors")
    (out / "ae_config.json").write_text(json.dumps(ae_cfg.to_json_dict(), indent=2))
    save(ae, "ae.safetensors")
    (out / "vision_head_config.json").write_text(json.dumps(spec.head.to_dict(), indent=2))
    save(head, "vision_head.safetensors")
    save(proj, "projector.safetensors")
    build_tokenizer(out)


def random_model(spec: ModelSpec, dtype=torch.float32, device="cpu", seed: int = 0,
                 with_encoder: bool = False):
    """A :class:`~bitdance_rt.checkpoint.BitDanceModel` of ``spec``'s shapes with random
    weights (benchmarks at any preset; no tokenizer, no LM head)."""
    from .checkpoint import BitDanceModel
    from .models.autoencoder import BinaryAutoencoder
    from .models.head import DiffusionHead
    from .models.projector import Projector
    from .models.qwen3 import Qwen3ForCausalLM, rope_inv_freq

    def causal_lm():
        m = Qwen3ForCausalLM(spec.llm)
        m.lm_head = None  # images never read it
        return m

    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    parts = []
    for factory in (causal_lm, lambda: DiffusionHead(spec.head),
                    lambda: BinaryAutoencoder(spec.ae),
                    lambda: Projector(spec.ae.z_channels, spec.llm.hidden_size)):
        with torch.device("meta"):
            m = factory().to(dtype)  # cast on meta: no float32 copy of 14B weights
        m.to_empty(device=device)
        randomize_(m, gen)
        parts.append(m.eval().requires_grad_(False))
    llm, head, ae, proj = parts
    llm.model.register_buffer(
        "inv_freq", rope_inv_freq(spec.llm.head_dim, spec.llm.rope_theta).to(device),
        persistent=False)
    if not with_encoder:
        ae.encoder = None
    return BitDanceModel(spec, llm, head, ae, proj, None, dtype, device, None)
