"""The fixed parts of a tensor record (``record_layout``): recognised for dcp-plugin's records and ``torch.save``'s,
whatever the tensor holds, and refused when any byte that describes the tensor differs."""

from __future__ import annotations

import io

import pytest
import torch

from dcp_plugin.storage.record_layout import layout_of
from dcp_plugin.storage.records import tensor_record

CASES = [
    (torch.float32, (3, 5)),
    (torch.bfloat16, (7,)),
    (torch.int64, ()),
    (torch.float16, (2, 3, 4)),
    (torch.bool, (5,)),
    (torch.uint8, (1000,)),
]


def _records(tensor: torch.Tensor) -> dict[str, bytes]:
    stream = io.BytesIO()
    torch.save(tensor, stream)
    head, data, tail = tensor_record(tensor)
    return {"torch.save": stream.getvalue(), "dcp-plugin": head + bytes(data) + tail}


def _parts(record: bytes, layout) -> tuple[bytes, bytes, bytes]:
    head, data = record[: len(layout.head)], record[len(layout.head) : len(layout.head) + layout.nbytes]
    return head, data, record[len(layout.head) + layout.nbytes :]


@pytest.mark.parametrize(("dtype", "shape"), CASES, ids=lambda case: str(case))
def test_both_writers_records_are_recognised_with_the_tensor_bytes_between_head_and_tail(dtype, shape):
    layout = layout_of(dtype, shape)
    for seed in (0, 1):
        tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        for writer, record in _records(tensor).items():
            assert len(record) == layout.length, writer
            head, data, tail = _parts(record, layout)
            assert layout.matches(head, tail), writer
            assert data == tensor.reshape(-1).view(torch.uint8).numpy().tobytes(), writer


def test_a_record_of_another_shape_dtype_or_strides_is_not_taken():
    layout = layout_of(torch.float32, (4, 8))
    for other in (torch.randn(8, 4), torch.randn(4, 8).double()[:, :4].float(), torch.randn(8, 4).t()):
        for writer, record in _records(other.contiguous() if other.is_contiguous() else other).items():
            if len(record) == layout.length:
                head, _data, tail = _parts(record, layout)
                assert not layout.matches(head, tail), writer
    grad = torch.randn(4, 8).requires_grad_()
    for writer, record in _records(grad).items():
        head, _data, tail = _parts(record, layout)
        assert not layout.matches(head, tail), writer  # requires_grad is part of the pickle


def test_every_byte_outside_the_data_dependent_fields_counts():
    layout = layout_of(torch.float32, (3, 5))
    record = _records(torch.randn(3, 5))["dcp-plugin"]
    head, _data, tail = _parts(record, layout)
    for position in range(0, len(head), 7):
        forged = bytearray(head)
        forged[position] ^= 0x01
        assert not layout.matches(bytes(forged), tail), position
    for position in range(0, len(tail), 7):
        forged = bytearray(tail)
        forged[position] ^= 0x01
        assert not layout.matches(head, bytes(forged)), position


def test_in_a_torch_save_record_only_crc32_fields_and_the_serialization_id_may_differ():
    layout = layout_of(torch.float32, (3, 5))
    record = _records(torch.randn(3, 5))["torch.save"]
    head, _data, tail = _parts(record, layout)
    kept = {position for start, end in layout.tail_kept for position in range(start, end)}
    assert len(kept) > len(tail) - 120  # a few crc32 fields and a 40-digit id
    for position in range(len(tail)):
        forged = bytearray(tail)
        forged[position] ^= 0x01
        assert layout.matches(head, bytes(forged)) == (position not in kept), position
