"""Shared fixtures: the bundled model (loaded once), and a tiny random 2-layer Llama with the bundled tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import maskscope as ms


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct (the first load ever dequantizes and caches it)."""
    return ms.load_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, bundled) -> Path:
    """A randomly initialised 2-layer Llama with the bundled tokenizer and chat template, saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(bundled.tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=bundled.tokenizer.bos_token_id,
        eos_token_id=bundled.tokenizer.eos_token_id,
        pad_token_id=bundled.tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so that distributions are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
    model.save_pretrained(directory)
    bundled.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    """The tiny model loaded through the registry, as a user would (`hf:DIR`)."""
    return ms.load_model(f"hf:{tiny_dir}")


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Reference: log-softmax of one plain single-sequence forward pass, no cache, no batching."""
    with torch.no_grad():
        logits = model.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
