"""Document masking: a token of a packed window attends only to its own document, so a packed,
masked window gives each document the logits it has alone; boundaries come from the EOS tokens."""

import warnings

import pytest
import torch

from bigtrain.config import from_dict
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.llama import (
    DocumentMasking,
    document_ids,
    document_positions,
    flex_document_attention,
    same_document_causal,
)
from tests.helpers import small_model_config

EOS = 1


def test_documents_and_positions_follow_the_eos_tokens():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]])
    documents = document_ids(tokens, EOS)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # an EOS ends its own document
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = same_document_causal(documents)[0, 0]
    assert mask[3].tolist() == [False, False, False, True, False, False, False, False]
    assert mask[7].tolist() == [False] * 6 + [True, True]


@pytest.mark.parametrize("reset_positions", [False, True])
def test_a_packed_masked_window_gives_each_document_its_logits_alone(reset_positions):
    cfg = small_model_config(max_seq_len=32)
    model = Llama(cfg, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.randint(2, cfg.vocab_size, (n,), generator=generator), torch.tensor([EOS])])
            for n in (6, 9, 4)]
    window = torch.cat(docs)[None]
    masking = DocumentMasking(EOS, reset_positions)
    with torch.no_grad():
        packed = model(window, None, *masking(window))
        unmasked = model(window)
        start = 0
        for doc in docs:
            alone = model(doc[None])
            torch.testing.assert_close(packed[:, start:start + len(doc)], alone, rtol=0, atol=1e-5)
            start += len(doc)
    assert (unmasked[:, len(docs[0]):] - packed[:, len(docs[0]):]).abs().max() > 1e-2  # masking matters
    torch.testing.assert_close(unmasked[:, :len(docs[0])], packed[:, :len(docs[0])], rtol=0, atol=1e-6)


def test_masking_changes_only_windows_that_hold_a_boundary():
    cfg = small_model_config(max_seq_len=16)
    model = Llama(cfg, seed=1).eval()
    masking = DocumentMasking(EOS)
    whole = torch.randint(2, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    split = whole.clone()
    split[0, 5] = EOS
    with torch.no_grad():
        for window, changes in ((whole, False), (split, True)):
            inputs, targets = window[:, :-1], window[:, 1:]
            difference = (model(inputs, targets, *masking(inputs)) - model(inputs, targets)).abs().item()
            assert (difference > 1e-4) == changes, difference


def test_flex_attention_equals_the_masked_sdpa_reference():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 16, 8, generator=generator)
    k, v = torch.randn(2, 2, 16, 8, generator=generator), torch.randn(2, 2, 16, 8, generator=generator)
    documents = document_ids(torch.tensor([[3, EOS] * 4 + [5] * 8, [4] * 5 + [EOS] + [6] * 10]), EOS)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=same_document_causal(documents),
                                                                 enable_gqa=True)
    with warnings.catch_warnings():  # eager FlexAttention warns that it is slow (CUDA compiles it)
        warnings.simplefilter("ignore")
        flex = flex_document_attention(q, k, v, documents, compiled=False)
    torch.testing.assert_close(flex, reference, rtol=0, atol=1e-6)


def test_position_reset_needs_masking():
    with pytest.raises(BigtrainError, match="data.reset_positions needs data.document_masking=true"):
        from_dict({"data": {"reset_positions": True}})
