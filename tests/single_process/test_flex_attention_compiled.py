"""FlexAttention's document mask (the CUDA path of document masking) under `torch.compile` on the
CPU: one graph, and each call's documents, not a cached earlier mask, decide what is attended."""

import torch

from bigtrain.model.llama import document_ids, flex_document_attention, same_document_causal

EOS = 1


def test_compiled_flex_attention_follows_each_calls_documents():
    q = torch.randn(1, 2, 128, 16, generator=torch.Generator().manual_seed(0))
    attend = torch.compile(lambda q, documents: flex_document_attention(q, q, q, documents, compiled=False),
                           fullgraph=True)
    first = document_ids(torch.tensor([[3, EOS] * 20 + [5] * 88]), EOS)
    second = document_ids(torch.tensor([[5] * 100 + [EOS] + [4] * 27]), EOS)
    for documents in (first, second, first.clone()):
        reference = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=same_document_causal(documents))
        torch.testing.assert_close(attend(q, documents), reference, rtol=0, atol=1e-6)
