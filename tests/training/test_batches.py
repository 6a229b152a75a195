"""Packing keeps sequences apart: a packed row gives the same logits and loss as each sequence alone."""

import torch

from training.batches import collate, micro_batches, pack_rows, single_rows
from training.data import Encoded, encode_chat
from training.loss import CausalLMLoss


def encoded_examples(tokenizer) -> list[Encoded]:
    pairs = [("How long is the warranty?", "Three years."), ("Default interval?", "Ten minutes, unless changed."),
             ("Who?", "Kestrel.")]
    return [encode_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer, max_seq_len=256)
            for q, a in pairs]


def test_packed_rows_match_separate_sequences(tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attn_implementation="sdpa").eval()
    examples = encoded_examples(tokenizer)
    packed = pack_rows(examples, max_seq_len=256)
    assert len(packed) == 1 and len(packed[0]) == sum(len(e.input_ids) for e in examples)
    batch = collate(packed, tokenizer.pad_token_id)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # Where each example landed in the row: pack_rows places longest first.
        offset = 0
        for index in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
            ids = torch.tensor([examples[index].input_ids])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed_logits[offset : offset + ids.shape[1]], alone, rtol=1e-4, atol=1e-4)
            offset += ids.shape[1]

        loss_model = CausalLMLoss(model, chunk_tokens=4)  # several lm_head chunks
        packed_sum, packed_n = loss_model(**batch)
        padded_sum, padded_n = loss_model(**collate(single_rows(examples), tokenizer.pad_token_id))
    assert packed_n == padded_n == sum(e.target_tokens for e in examples)
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-4, atol=1e-4)


def test_chunked_loss_equals_the_models_own_loss(tiny_llama_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    batch = collate(single_rows(encoded_examples(tokenizer)[:1]), tokenizer.pad_token_id)
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    total, count = CausalLMLoss(model, chunk_tokens=3)(**batch)
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-5)
    total.backward()  # chunks are recomputed in backward
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_micro_batches_are_seeded_and_sharded():
    assert micro_batches(10, 3, seed=0, epoch=0) == micro_batches(10, 3, seed=0, epoch=0)
    assert micro_batches(10, 3, seed=0, epoch=0) != micro_batches(10, 3, seed=0, epoch=1)
    rank0 = micro_batches(10, 3, seed=0, epoch=0, rank=0, world=2)
    rank1 = micro_batches(10, 3, seed=0, epoch=0, rank=1, world=2)
    assert len(rank0) == len(rank1) == 2 and not set(sum(rank0, [])) & set(sum(rank1, []))
