"""dtype="bf16": the values rounded to nearest even, handed over through DLPack.

The DLPack export is checked without torch by reading the capsule with ctypes and by
handing it to jax (when installed; CI installs it); the
torch round trip runs when torch is installed (CI does not install it: the test is
reported as skipped)."""

import ctypes

import numpy as np
import pytest

import gradshard
from conftest import bf16_rne, bits


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


def read_capsule(cap):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    t = DLManagedTensor.from_address(get(cap, b"dltensor")).dl_tensor
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim))
    n = int(np.prod(shape))
    raw = (ctypes.c_uint16 * n).from_address(t.data + t.byte_offset)
    return t, shape, strides, np.frombuffer(bytes(raw), dtype=np.uint16).reshape(shape)


def test_dlpack_capsule_holds_rne_bf16(ingested):
    s = gradshard.open(ingested[("llama-gqa", "f32")])
    f = s.tile("math", 1, "O", 3)
    want = (bits(bf16_rne(f)) >> 16).astype(np.uint16)
    # Rounding does happen: the f32 store holds values bf16 cannot.
    assert not np.array_equal(bits(bf16_rne(f)), bits(f))
    a = gradshard.bf16_dlpack(f)
    assert a.shape == list(f.shape) and a.__dlpack_device__() == (1, 0)
    cap = a.__dlpack__()
    t, shape, strides, got = read_capsule(cap)
    assert (t.device.device_type, t.dtype.code, t.dtype.bits, t.dtype.lanes) == (1, 4, 16, 1)
    assert shape == f.shape and strides == (f.shape[1] * f.shape[2], f.shape[2], 1)
    assert np.array_equal(got, want)
    with pytest.raises(BufferError):
        a.__dlpack__()  # exported once: the consumer owns the buffer
    del cap  # a capsule nobody consumed frees its tensor
    # Non-contiguous input is taken in logical order.
    _, _, _, got_t = read_capsule(gradshard.bf16_dlpack(f[0].T).__dlpack__())
    assert np.array_equal(got_t, want[0].T)


def test_bf16_without_torch_says_so(ingested):
    try:
        import torch  # noqa: F401
    except ImportError:
        s = gradshard.open(ingested[("llama-gqa", "f32")])
        with pytest.raises(ImportError, match="needs torch"):
            s.slice("math", 0, 0, "Q", 0, dtype="bf16")
    else:
        pytest.skip("torch is installed")


@pytest.mark.parametrize("model", ["llama-gqa", "gpt2"])
def test_bf16_torch_tensors_round_to_nearest_even(ingested, model):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional; CI does not install it)")
    s32 = gradshard.open(ingested[(model, "f32")])
    s16 = gradshard.open(ingested[(model, "bf16")])
    for st in (s32, s16):
        f = s32.slice("math", 2, 1, "K", 1)
        t = st.slice("math", 2, 1, "K", 1, dtype="bf16")
        assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and tuple(t.shape) == f.shape
        assert np.array_equal(bits(t.float().numpy()), bits(bf16_rne(f)))
        tile = st.tile("math", 0, "O", 1, dtype="bf16")
        assert np.array_equal(bits(tile.float().numpy()), bits(bf16_rne(s32.tile("math", 0, "O", 1))))
        name = s32.tensors[0]
        w = st.tensor("math", 2, name, dtype="bf16")
        assert np.array_equal(bits(w.float().numpy()), bits(bf16_rne(s32.tensor("math", 2, name))))
    # The torch tensor owns its memory: it outlives the store and can be written.
    t = s32.tile("general", 1, "V", 0, dtype="bf16")
    del s32, s16
    t += 1
    assert torch.isfinite(t).all()


def test_bf16_dlpack_into_jax(ingested):
    """A real DLPack consumer other than torch (CI installs jax for this)."""
    jax = pytest.importorskip("jax", reason="jax is not installed")
    import jax.numpy as jnp

    s32 = gradshard.open(ingested[("gpt2", "f32")])
    s16 = gradshard.open(ingested[("gpt2", "bf16")])
    for st in (s32, s16):
        f = st.tile("general", 1, "V", 2)
        x = jax.dlpack.from_dlpack(gradshard.bf16_dlpack(f))
        assert x.dtype == jnp.bfloat16 and x.shape == f.shape
        assert np.array_equal(bits(np.asarray(x.astype(jnp.float32))), bits(bf16_rne(f)))
    # From the bf16 store the values are already bf16: nothing is rounded twice.
    f16 = s16.tile("general", 1, "V", 2)
    assert np.array_equal(bits(bf16_rne(f16)), bits(f16))
