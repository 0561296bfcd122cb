"""The offline checkpoint's tokenizer is Llama 3's: the real model's token ids, checked against tiktoken."""

from __future__ import annotations

import pytest
import tiktoken
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoConfig, AutoProcessor

from csmserve.engine.tiny import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT, llama3_ranks_path

TEXTS = [
    "[0]Hello world, this is a test",
    "[1]The past is just a story we tell ourselves.",
    "  Two  spaces,\n\nnew lines\tand tabs: 1234567 items @ $9.99 (don't, we'll, I'VE)",
    "Ünïcödé: naïve café, 日本語のテキスト, Здравствуйте, emoji 🎉🙂",
    "https://example.com/a?b=c&d=e ... --- ''' \"quoted\"",
]


@pytest.fixture(scope="module")
def tiktoken_llama3() -> tiktoken.Encoding:
    """An independent encoder: tiktoken over the same ranks file, with Meta's own split pattern."""
    special = {token: 128_000 + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name="llama3",
        pat_str=MetaTokenizer.pat_str,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_ranks_path())),
        special_tokens=special,
    )


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_equal_tiktokens_over_the_same_ranks(processor, tiktoken_llama3, text):
    """Each text encodes to tiktoken's ids, between <|begin_of_text|> and <|end_of_text|>."""
    ids = processor.tokenizer(text)["input_ids"]
    assert ids == [128_000, *tiktoken_llama3.encode(text), 128_001]
    assert processor.tokenizer.decode(ids[1:-1]) == text


def test_special_token_ids_are_llama3s_and_csms(processor):
    """BOS 128000, EOS 128001; csm-1b's <|AUDIO|> and <|audio_eos|> are Llama 3's first reserved ids."""
    tokenizer = processor.tokenizer
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|AUDIO|>", "<|audio_eos|>"]
    ids = tokenizer.convert_tokens_to_ids(names)
    assert ids == [128_000, 128_001, 128_002, 128_003]
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128_009
    assert tokenizer.convert_tokens_to_ids("<|reserved_special_token_245|>") == 128_255
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (128_000, 128_001)


def test_checkpoint_config_matches_the_tokenizer(processor, tiny_model_dir):
    """config.json's text vocabulary and special ids are the tokenizer's: 128,256 rows, BOS, EOS, audio."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.text_vocab_size == len(processor.tokenizer) == 128_256
    special = (config.bos_token_id, config.audio_token_id, config.audio_eos_token_id)
    assert special == (128_000, 128_002, 128_003)


def test_the_model_card_prompt_is_bos_text_eos(processor, tiktoken_llama3):
    """The prompt as the server builds it (processor, special tokens on): BOS, Llama 3 tokens, EOS."""
    prompt = "[0]Hello world, this is a test"
    ids = processor(prompt, add_special_tokens=True)["input_ids"][0].tolist()
    assert ids == [128_000, *tiktoken_llama3.encode(prompt), 128_001]
    assert len(ids) == 12  # a byte-level stand-in made it 32


def test_chat_template_turns_get_bos_and_eos(processor):
    """A conversation through the chat template tokenizes as BOS [speaker]text EOS per turn."""
    conversation = [{"role": "0", "content": [{"type": "text", "text": "Hi there."}]}]
    encoded = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == 128_000 and ids[-1] == 128_001
    assert ids == processor("[0]Hi there.", add_special_tokens=True)["input_ids"][0].tolist()


def test_split_pattern_is_metas():
    """The pre-tokenizer's split is the pattern Meta's tiktoken tokenizer uses."""
    assert LLAMA3_SPLIT == MetaTokenizer.pat_str
