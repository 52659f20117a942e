"""Shared pieces of the reliability tests: a tiny random LLaMA with a toy word-level tokenizer."""

import functools

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import randomize_
from hooked_attn import HookedTransformer

WORDS = ["<unk>", "<pad>", "<bos>", "<eos>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "away", "and",
         "big", "red", "rug", "hi"]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


def llama_config(**overrides) -> transformers.LlamaConfig:
    base = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=2,
                eos_token_id=3, pad_token_id=1)
    return transformers.LlamaConfig(**{**base, **overrides})


@functools.cache
def _llama_hf(seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(llama_config(), attn_implementation="eager").eval()
    return randomize_(hf, seed)


def tiny_llama(seed: int = 0, process: bool = False) -> HookedTransformer:
    """A fresh 2-layer LLaMA (perturbed random weights) with the word tokenizer."""
    load = HookedTransformer.from_pretrained if process else HookedTransformer.from_pretrained_no_processing
    return load(_llama_hf(seed), tokenizer=word_tokenizer())


def tiny_gpt2(seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=len(WORDS)), attn_implementation="eager").eval()
    return HookedTransformer.from_pretrained_no_processing(randomize_(hf, seed), tokenizer=word_tokenizer())
