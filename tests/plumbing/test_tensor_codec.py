"""The wire codec refuses what does not match before touching the bytes (pure logic)."""
import pytest
import torch

from herdpb import tensor_pb2
from plumbing.tensor_codec import WireError, read_tensor, write_tensor


def msg_of(t):
    return write_tensor(tensor_pb2.Tensor(), t)


def test_round_trip_is_exact_for_each_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(5, 8).to(dtype)
        assert torch.equal(read_tensor(msg_of(t), dtype=dtype, cols=8, max_rows=5), t)


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: setattr(m, "dtype", "float64"), "not allowed"),
    (lambda m: setattr(m, "dtype", "float16"), "compute dtype"),
    (lambda m: m.shape.__setitem__(1, 9), "shape"),
    (lambda m: m.shape.append(1), "shape"),
    (lambda m: setattr(m, "data", m.data[:-1]), "bytes"),
    (lambda m: m.shape.__setitem__(0, 6), "shape"),
])
def test_mismatches_are_named(mutate, needle):
    m = msg_of(torch.randn(5, 8))
    mutate(m)
    with pytest.raises(WireError, match=needle):
        read_tensor(m, dtype=torch.float32, cols=8, max_rows=5)


def test_answers_must_have_exactly_the_rows_asked_for_and_be_finite():
    with pytest.raises(WireError, match=r"expected \[5, 8\]"):
        read_tensor(msg_of(torch.randn(4, 8)), dtype=torch.float32, cols=8, max_rows=5, exact=True)
    bad = torch.randn(2, 8)
    bad[1, 1] = float("inf")
    with pytest.raises(WireError, match="NaN or infinity"):
        read_tensor(msg_of(bad), dtype=torch.float32, cols=8, max_rows=2)


def test_decoding_into_a_block_of_a_buffer_writes_only_that_block_and_keeps_every_check():
    buf = torch.zeros(6, 8)
    t = torch.randn(2, 8)
    got = read_tensor(msg_of(t), dtype=torch.float32, cols=8, max_rows=2, out=buf[3:5])
    assert got.data_ptr() == buf[3:5].data_ptr() and torch.equal(buf[3:5], t)
    assert not buf[:3].any() and not buf[5:].any()
    with pytest.raises(WireError, match=r"expected \[3, 8\]"):  # out fixes the row count
        read_tensor(msg_of(t), dtype=torch.float32, cols=8, max_rows=6, out=buf[0:3])
    bad = msg_of(t)
    bad.data = bad.data[:-4]
    with pytest.raises(WireError, match="bytes"):
        read_tensor(bad, dtype=torch.float32, cols=8, max_rows=2, out=buf[0:2])
    with pytest.raises(WireError, match="compute dtype"):
        read_tensor(msg_of(t.half()), dtype=torch.float32, cols=8, max_rows=2, out=buf[0:2])
    with pytest.raises(ValueError, match="contiguous"):
        read_tensor(msg_of(t), dtype=torch.float32, cols=8, max_rows=2, out=torch.zeros(8, 2).t())


def test_a_decoded_tensor_owns_its_memory():
    m = msg_of(torch.ones(2, 8))
    t = read_tensor(m, dtype=torch.float32, cols=8, max_rows=2)
    t += 1  # writable, and the message keeps its bytes
    assert torch.equal(read_tensor(m, dtype=torch.float32, cols=8, max_rows=2), torch.ones(2, 8))


def test_non_contiguous_and_bfloat16_tensors_travel():
    t = torch.randn(8, 5).t()
    assert torch.equal(read_tensor(msg_of(t), dtype=torch.float32, cols=8, max_rows=5), t)
    b = torch.randn(3, 8).bfloat16()
    assert torch.equal(read_tensor(msg_of(b), dtype=torch.bfloat16, cols=8, max_rows=3), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused_in_every_dtype(dtype, bad):
    t = torch.randn(3, 8).to(dtype)
    t[2, 7] = bad
    with pytest.raises(WireError, match="NaN or infinity"):
        read_tensor(msg_of(t), dtype=dtype, cols=8, max_rows=3)
    with pytest.raises(WireError, match="NaN or infinity"):
        read_tensor(msg_of(t), dtype=dtype, cols=8, max_rows=3, out=torch.empty(3, 8, dtype=dtype))
