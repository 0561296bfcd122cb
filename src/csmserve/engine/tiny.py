"""The offline checkpoint: a tiny CSM with random weights in the file layout of ``sesame/csm-1b``.

It is written with ``transformers``/``tokenizers`` classes only and loads through the same
``from_pretrained`` path as the real model, so tests and demos exercise the real loading,
prompting, generation and decoding code without the 6 GB of gated weights. Its audio is noise.

The architecture keeps everything the server depends on (Llama 3's tokenizer and 128,256-token text
vocabulary, so prompts have the real model's token ids and lengths; 32 codebooks of 2051 ids; a Mimi codec
at 24 kHz with 1920-sample frames, 2048 codec codes; the special token names) and shrinks the widths.
"""

from __future__ import annotations

import json
from pathlib import Path

# A marker in config.json so that /health and the start-up log can say the voice is not real.
OFFLINE_MARKER = "csmserve_offline_model"
SEED = 1234

# The text side is Llama 3's: Meta's BPE ranks (``tokenizer.model`` from the ``llama-models`` package),
# 128,000 ranked tokens, then 256 special tokens. csm-1b names two of them for audio.
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
AUDIO, AUDIO_EOS = "<|AUDIO|>", "<|audio_eos|>"
LLAMA3_SPECIAL_TOKENS = [
    BOS,
    EOS,
    AUDIO,  # <|reserved_special_token_0|> in Llama 3
    AUDIO_EOS,  # <|reserved_special_token_1|>
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
TEXT_VOCAB_SIZE = 128_256  # 128,000 ranked tokens + 256 special ones, as in csm-1b's config
# Llama 3's pre-tokenizer split (llama_models/llama3/tokenizer.py ``pat_str``).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# CSM's chat template (conversation of {"role": speaker id, "content": [text, audio]} turns).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not (message['role'] | string).isdigit() %}"
    "{{- raise_exception(\"The role must be an integer or a convertible string to an integer.\") }}"
    "{%- endif %}"
    "{%- if not message['content'][0]['type'] == 'text' %}"
    "{{- raise_exception(\"The first content must be text.\") }}"
    "{%- endif %}"
    "{{- bos_token }}{{- '[' + message['role'] | string + ']' }}{{- message['content'][0]['text'] }}{{- eos_token }}"
    "{%- if message['content'] | length > 1 %}"
    "{{- '<|AUDIO|><|audio_eos|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def tiny_codec_config():
    """A small Mimi config with the real codec's frame rate, sample rate and codebooks."""
    from transformers import MimiConfig

    return MimiConfig(
        sampling_rate=24_000,
        frame_rate=12.5,
        audio_channels=1,
        hidden_size=32,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=2048,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=32,
        num_semantic_quantizers=1,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=250,
        max_position_embeddings=8000,
        use_cache=False,
    )


def randomize_codebooks(codec) -> None:
    """Give a freshly initialised Mimi codec random codebook vectors.

    ``transformers`` initialises every codebook to zeros, which makes a random codec's audio the
    same for every code: the offline model would then play one fixed sound and parity tests would
    not see the quantizer. Trained codebooks are what the real checkpoint carries instead.
    """
    import torch

    from csmserve.engine.loading import forget_cached_codebooks

    for module in codec.modules():
        if hasattr(module, "embed_sum") and hasattr(module, "cluster_usage"):
            with torch.no_grad():
                module.embed_sum.normal_(0.0, 1.0)
                module.cluster_usage.fill_(1.0)
    forget_cached_codebooks(codec)


def _quieten(codec, target_rms: float = 0.1) -> None:
    """Scale the codec's last convolution so random codes decode to noise at ``target_rms``, not clipping."""
    import torch

    with torch.no_grad():
        codes = torch.randint(0, codec.config.codebook_size, (1, codec.config.num_quantizers, 25))
        rms = codec.decode(codes).audio_values.pow(2).mean().sqrt().item()
        seanet = getattr(codec.decoder, "decoder_seanet", codec.decoder)  # transformers 5 nests it
        last = seanet.layers[-1].conv
        last.weight.mul_(target_rms / rms)
        if last.bias is not None:
            last.bias.mul_(target_rms / rms)


BACKBONE_WIDTH = 32
SPECIAL_IDS = (BOS, EOS, AUDIO, AUDIO_EOS)


def tiny_config():
    """The tiny CSM config: Llama 3's text vocabulary, 32 codebooks of 2051 ids, a 2048-token window,
    small widths."""
    from transformers import CsmConfig

    first_special = TEXT_VOCAB_SIZE - len(LLAMA3_SPECIAL_TOKENS)
    bos_id, eos_id, audio_id, audio_eos_id = (
        first_special + LLAMA3_SPECIAL_TOKENS.index(token) for token in SPECIAL_IDS
    )
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    # The text embedding has Llama 3's 128,256 rows: a width of 32 keeps it at 16 MB in float32.
    return CsmConfig(
        num_codebooks=32,
        vocab_size=2051,
        text_vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=BACKBONE_WIDTH,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=audio_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        audio_token_id=audio_id,
        audio_eos_token_id=audio_eos_id,
        codebook_pad_token_id=2050,
        codebook_eos_token_id=0,
        rope_parameters=rope,
        depth_decoder_config={
            "num_codebooks": 32,
            "backbone_hidden_size": BACKBONE_WIDTH,
            "vocab_size": 2051,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 33,
            "rope_parameters": rope,
        },
        codec_config=tiny_codec_config().to_dict(),
    )


def llama3_ranks_path() -> Path:
    """Meta's Llama 3 ``tokenizer.model`` (tiktoken BPE ranks: base64 token, rank per line), as shipped in
    the ``llama-models`` package; found through the package's file list, without importing it."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        listed = files("llama-models") or []
    except PackageNotFoundError:
        listed = []
    for entry in listed:
        if str(entry).replace("\\", "/").endswith(("llama_models/llama3/tokenizer.model",
                                                      "llama_models/llama3/api/tokenizer.model")):
            return Path(entry.locate())
    raise FileNotFoundError(
        "Llama 3's tokenizer.model was not found: pip install llama-models (a csmserve dependency)"
    )


def read_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file as {token bytes: rank}."""
    import base64

    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks as a byte-level BPE vocabulary and merge list for ``tokenizers``.

    A token is the merge of the two ranked pieces it splits into; merges are ordered by the rank of
    the token they make, so that BPE applies them in tiktoken's order (transformers' TikTokenConverter
    does the same).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel's printable alphabet, in the order GPT-2's bytes_to_unicode assigns it.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    unicode_of = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in unicode_of:
            unicode_of[b] = chr(256 + extra)
            extra += 1
    assert set(unicode_of.values()) == set(ByteLevel.alphabet())

    def text(token: bytes) -> str:
        return "".join(unicode_of[b] for b in token)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        if len(token) == 1:
            continue
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return vocab, [(text(left), text(right)) for left, right, _ in merges]


def llama3_tokenizer():
    """Llama 3's tokenizer as csm-1b carries it: a ``tokenizers`` BPE over Meta's ranks with Llama 3's
    pre-tokenizer and 256 special tokens (128000-128255), BOS and EOS around every text segment.

    Token ids equal tiktoken's over the same ranks file (``<|begin_of_text|>`` = 128000,
    ``<|end_of_text|>`` = 128001, ``<|AUDIO|>`` = 128002, ``<|audio_eos|>`` = 128003).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = bpe_from_ranks(read_ranks(llama3_ranks_path()))
    # ignore_merges: a whole pre-token that is itself a ranked token is taken as is, as tiktoken does.
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    assert core.get_vocab_size() == TEXT_VOCAB_SIZE
    bos_id, eos_id = core.token_to_id(BOS), core.token_to_id(EOS)
    # As the real CSM tokenizer does: BOS and EOS around every text segment.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0 {EOS}:0",
        pair=f"{BOS}:0 $A:0 {EOS}:0 {BOS}:1 $B:1 {EOS}:1",
        special_tokens=[(BOS, bos_id), (EOS, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=AUDIO,
        model_max_length=2048,
    )


def compact_tokenizer_json(path: Path) -> None:
    """Rewrite a saved tokenizer.json without indentation and with merges as "left right" strings.

    The same tokenizer (``tokenizers`` reads both merge forms; byte-level tokens hold no spaces) in a
    third of the bytes: 6 MB instead of 17, and 0.4 s to load instead of 1.5, for a model the test
    suite loads many times.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def make_tiny_model(directory: str | Path) -> Path:
    """Write the offline checkpoint to ``directory`` (created if needed) and return its path.

    Deterministic: the same seed gives the same weights. Nothing is downloaded.
    """
    import torch
    from transformers import (
        CsmForConditionalGeneration,
        CsmProcessor,
        EncodecFeatureExtractor,
        GenerationConfig,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = CsmForConditionalGeneration(config).eval()
        randomize_codebooks(model.codec_model)
        _quieten(model.codec_model)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        max_length=1024,
    )
    model.depth_decoder.generation_config = GenerationConfig(do_sample=True, temperature=0.9, top_k=50)
    model.save_pretrained(out)

    processor = CsmProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=24_000, padding_value=0.0),
        tokenizer=llama3_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    compact_tokenizer_json(out / "tokenizer.json")

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[OFFLINE_MARKER] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def is_offline_model(config) -> bool:
    """True when a loaded config is the offline checkpoint (random weights, noise)."""
    return bool(getattr(config, OFFLINE_MARKER, False))
