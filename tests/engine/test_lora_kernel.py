"""The segmented LoRA kernels against their torch reference: decode rows in any slot order, prompts
with padding, h read from the stacked GEMM's tail, the fused activation. On CPU the kernels run in
Triton's interpreter."""

import pytest
import torch

from server.engine.lora_ops import (
    expand_add,
    lora_expand_reference_,
    lora_shrink_reference,
    silu_mul_lora,
    silu_mul_reference,
)
from server.engine.lora_triton import lora_expand_, lora_shrink, silu_mul
from server.engine.segments import segment_prompts, segment_rows, to_segments

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SLOTS, RANK = 3, 8


def group_weights(outs: list[int], in_features: int, seed: int):
    """A (slots * width, in) and block-diagonal B (slots * width, sum(outs)) as AdapterSlots lays them out."""
    gen = torch.Generator().manual_seed(seed)
    width = len(outs) * RANK
    a = torch.randn(SLOTS * width, in_features, generator=gen) / in_features**0.5
    b = torch.zeros(SLOTS * width, sum(outs))
    for slot in range(SLOTS):
        for j, out in enumerate(outs):
            rows = slice(slot * width + j * RANK, slot * width + (j + 1) * RANK)
            b[rows, sum(outs[:j]) : sum(outs[:j]) + out] = torch.randn(RANK, out, generator=gen)
    return a.to(DEVICE, DTYPE), b.to(DEVICE, DTYPE)


def offsets(outs):
    return tuple(sum(outs[:j]) for j in range(len(outs)))


def close(actual, expected):
    tolerance = dict(atol=2e-2, rtol=2e-2) if DTYPE == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual, expected, **tolerance)


@pytest.mark.parametrize("outs", [[48, 16, 16], [40], [24, 24]], ids=["qkv", "o", "gate_up"])
def test_prompt_segments_match_reference(outs):
    in_features, width = 32, len(outs) * RANK
    a, b = group_weights(outs, in_features, seed=len(outs))
    lengths, slots, pad_to = [5, 19, 12, 3], [2, 0, 2, 3], 20  # slot 0: a prompt without an adapter
    x = torch.randn(len(lengths) * pad_to, in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    # blocks of 8 rows: the 19-token prompt spans three blocks, the last one padded
    segments = to_segments(segment_prompts(lengths, slots, width=pad_to, block_m=8), device=DEVICE)
    base = torch.randn(x.shape[0], sum(outs)).to(DEVICE, DTYPE)

    h = lora_shrink(x, a, segments, width=width)
    expected_h = lora_shrink_reference(x, a, segments, width=width)
    covered = torch.tensor([i * pad_to + t for i, (n, slot) in enumerate(zip(lengths, slots)) if slot
                            for t in range(n)], device=DEVICE)
    close(h[covered], expected_h[covered])

    actual = lora_expand_(base.clone(), expected_h, b, segments, rank=RANK, width=width, out_offsets=offsets(outs))
    expected = lora_expand_reference_(base.clone(), expected_h, b, segments, width=width)
    close(actual, expected)
    untouched = torch.ones(x.shape[0], dtype=torch.bool)
    untouched[covered.cpu()] = False
    assert torch.equal(actual[untouched.to(DEVICE)], base[untouched.to(DEVICE)])  # padding and slot-0 prompt
    # and against the plain per-token definition
    token = 20 * 2 + 7  # prompt 2 (slot 2), token 7
    lo = 1 * width
    manual = base[token].float() + (x[token].float() @ a[lo : lo + width].float().t()) @ b[lo : lo + width].float()
    close(actual[token].float(), manual)


def test_decode_rows_read_their_slot_from_the_stacked_tail():
    """Decode: rows in any order share slots; h of every slot sits after the base output in y."""
    outs, in_features = [48, 16, 16], 32
    width = len(outs) * RANK
    a, b = group_weights(outs, in_features, seed=7)
    slots = [3, 0, 1, 3, 1, 1, 0, 2, 3]
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    y = torch.cat([torch.randn(len(slots), sum(outs)).to(DEVICE, DTYPE), x @ a.t()], dim=1)  # the stacked GEMM
    plan = segment_rows(slots, block_m=2)  # slot 1's three rows take two blocks; rows without an adapter: slot 0
    assert plan.slot == [0, 1, 1, 2, 3, 3] and plan.rows.tolist() == [1, 6, 2, 4, 5, -1, 7, -1, 0, 3, 8, -1]
    segments = to_segments(plan, device=DEVICE, capacity=len(slots))

    actual = lora_expand_(y.clone(), y, b, segments, rank=RANK, width=width, out_offsets=offsets(outs),
                          h_col0=sum(outs), h_slot_stride=width)
    expected = lora_expand_reference_(y.clone(), y[:, sum(outs):], b, segments, width=width, h_slot_stride=width)
    close(actual, expected)
    for row, slot in enumerate(slots):
        head = y[row, : sum(outs)].float()
        if slot:
            lo = (slot - 1) * width
            head = head + y[row, sum(outs) + lo : sum(outs) + lo + width].float() @ b[lo : lo + width].float()
        close(actual[row, : sum(outs)].float(), head)


def test_a_captured_plan_with_spare_blocks_skips_them():
    """Graph replays launch their capacity of blocks; the ones past the step's plan have no slot."""
    outs, in_features = [40], 32
    a, b = group_weights(outs, in_features, seed=3)
    segments = to_segments(segment_rows([0, 2, 0, 0]), device=DEVICE, capacity=4)
    spare = type(segments)(meta=segments.meta, blocks=4, block_m=segments.block_m)
    x = torch.randn(4, in_features).to(DEVICE, DTYPE)
    base = torch.randn(4, 40).to(DEVICE, DTYPE)
    h = lora_shrink(x, a, spare, width=RANK)
    actual = lora_expand_(base.clone(), h, b, spare, rank=RANK, width=RANK, out_offsets=(0,))
    assert torch.equal(actual[[0, 2, 3]], base[[0, 2, 3]])
    close(actual[1].float(), base[1].float() + (x[1].float() @ a[RANK : 2 * RANK].float().t()) @ b[RANK : 2 * RANK].float())


@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "base"])
def test_fused_activation_matches_expand_then_silu_mul(with_lora):
    """Prompts' gate/up: LoRA added and silu(gate) * up applied in one pass, every token covered
    (padding and the prompt without an adapter get the plain activation)."""
    intermediate, in_features = 24, 32
    outs = [intermediate, intermediate]
    width = 2 * RANK
    a, b = group_weights(outs, in_features, seed=5)
    lengths, slots, pad_to = [5, 19, 12], [2, 0, 3], 20
    x = torch.randn(len(lengths) * pad_to, in_features, generator=torch.Generator().manual_seed(4)).to(DEVICE, DTYPE)
    gate_up = torch.randn(x.shape[0], 2 * intermediate, generator=torch.Generator().manual_seed(6)).to(DEVICE, DTYPE)
    if not with_lora:
        close(silu_mul(gate_up), silu_mul_reference(gate_up, None, None, None, rank=0))
        return
    segments = to_segments(segment_prompts(lengths, slots, width=pad_to, block_m=16), device=DEVICE)
    h = lora_shrink_reference(x, a, segments, width=width)
    actual = silu_mul(gate_up, h, b, segments, rank=RANK)
    expected = silu_mul_reference(gate_up, h, b, segments, rank=RANK)
    close(actual, expected)
    token = 2 * pad_to + 3  # prompt 2 (slot 3)
    lo = 2 * width
    g, u = (gate_up[token].float() + h[token, :].float() @ b[lo : lo + width].float()).chunk(2)
    close(actual[token].float(), torch.nn.functional.silu(g) * u)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "entry-point"])
def test_decode_residual_and_activation_read_h_from_the_stacked_tail(kernel):
    """Decode steps fuse the o/down LoRA into the residual add and the gate/up LoRA into the activation,
    h read from the stacked GEMM's tail; rows without an adapter get the plain result. The entry points
    run the kernel on CUDA and the torch reference on CPU."""
    in_features, hidden, intermediate = 32, 40, 24
    slots = [3, 0, 1, 3, 1, 1, 0, 2, 3]
    segments = to_segments(segment_rows(slots), device=DEVICE, capacity=len(slots))
    x = torch.randn(len(slots), in_features, generator=torch.Generator().manual_seed(8)).to(DEVICE, DTYPE)
    residual = torch.randn(len(slots), hidden, generator=torch.Generator().manual_seed(9)).to(DEVICE, DTYPE)

    a, b = group_weights([hidden], in_features, seed=11)
    y = torch.cat([torch.randn(len(slots), hidden).to(DEVICE, DTYPE), x @ a.t()], dim=1)
    if kernel:
        summed = lora_expand_(y.clone(), y, b, segments, rank=RANK, width=RANK, out_offsets=(0,), h_col0=hidden,
                              h_slot_stride=RANK, residual=residual)
    else:
        summed = expand_add(residual, y, y, b, segments, rank=RANK, width=RANK, h_col0=hidden, h_slot_stride=RANK)
    a_gu, b_gu = group_weights([intermediate, intermediate], in_features, seed=12)
    gu = torch.cat([torch.randn(len(slots), 2 * intermediate).to(DEVICE, DTYPE), x @ a_gu.t()], dim=1)
    fused = silu_mul if kernel else silu_mul_lora
    act = fused(gu, gu, b_gu, segments, rank=RANK, intermediate=intermediate, h_col0=2 * intermediate,
                h_slot_stride=2 * RANK)
    for row, slot in enumerate(slots):
        projected, gate_up = y[row, :hidden].float(), gu[row, : 2 * intermediate].float()
        if slot:
            lo = (slot - 1) * RANK
            projected = projected + y[row, hidden + lo : hidden + lo + RANK].float() @ b[lo : lo + RANK].float()
            lo = (slot - 1) * 2 * RANK
            h = gu[row, 2 * intermediate + lo : 2 * intermediate + lo + 2 * RANK].float()
            gate_up = gate_up + h @ b_gu[lo : lo + 2 * RANK].float()
        close(summed[row].float(), residual[row].float() + projected)
        gate, up = gate_up.chunk(2)
        close(act[row].float(), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize(("outs", "residual"), [([48, 16, 16], False), ([40], False), ([40], True)],
                         ids=["qkv", "o_in_place", "o_residual"])
def test_fused_shrink_expand_matches_the_two_kernels(outs, residual):
    """One launch per block (h kept in registers) gives what shrink then expand give, the residual add
    included (as the model uses it: for one-module groups, o and down), for prompts with padding and a
    prompt without an adapter."""
    from server.engine.lora_triton import lora_shrink_expand_

    in_features, width = 40, len(outs) * RANK  # 40: the shrink's K loop ends in a partial tile
    a, b = group_weights(outs, in_features, seed=7)
    lengths, slots, pad_to = [5, 19, 12, 3], [2, 0, 2, 3], 20
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(lengths) * pad_to, in_features, generator=gen).to(DEVICE, DTYPE)
    base = torch.randn(x.shape[0], sum(outs), generator=gen).to(DEVICE, DTYPE)
    skip = torch.randn(x.shape[0], sum(outs), generator=gen).to(DEVICE, DTYPE) if residual else None
    segments = to_segments(segment_prompts(lengths, slots, width=pad_to, block_m=8), device=DEVICE)

    h = lora_shrink(x, a, segments, width=width)
    y = base.clone()
    fused = lora_shrink_expand_(x, a, y, b, segments, rank=RANK, width=width, out_offsets=offsets(outs),
                                residual=skip)
    if residual:
        expected = expand_add(skip, base.clone(), h, b, segments, rank=RANK, width=width)
        assert torch.equal(y, base)  # the projection's output is read, not written
    else:
        expected = lora_expand_(base.clone(), h, b, segments, rank=RANK, width=width, out_offsets=offsets(outs))
        assert fused is y
    close(fused, expected)
    token = 20 * 2 + 7  # prompt 2 (slot 2), token 7
    lo = 1 * width
    manual = base[token].float() + (x[token].float() @ a[lo : lo + width].float().t()) @ b[lo : lo + width].float()
    if residual:
        manual = manual + skip[token].float()
    close(fused[token].float(), manual)
    if not residual:  # the prompt without an adapter and the padding keep the base output
        assert torch.equal(fused[5:40], base[5:40]) and torch.equal(fused[52:60], base[52:60])
