//! bfloat16 arrays handed to Python through DLPack (numpy has no bf16; torch, JAX and
//! CuPy take DLPack). [`Bf16Array`] implements the Python array-API protocol
//! (`__dlpack__`, `__dlpack_device__`) and exports its buffer once, without a copy, as
//! a legacy (unversioned) `dltensor` capsule, which every consumer accepts.
//!
//! The structs mirror `dlpack.h` (v0.8 ABI, the layout of DLManagedTensor that the
//! legacy capsule carries).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Mutex;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyCapsule;

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const KDL_CPU: i32 = 1;
const KDL_BFLOAT: u8 = 4;
const CAPSULE_NAME: &std::ffi::CStr = c"dltensor";

/// What a managed tensor owns: the values, shape and strides it points into.
struct Owned {
    bits: Vec<u16>,
    shape: Vec<i64>,
    strides: Vec<i64>,
}

/// Frees a managed tensor and what it owns. Called by the consumer when it is done,
/// or by the capsule's destructor when no consumer took the capsule.
unsafe extern "C" fn deleter(t: *mut DLManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` and its manager_ctx were made by `Box::into_raw` in `export`, and
    // DLPack calls the deleter exactly once.
    unsafe {
        let t = Box::from_raw(t);
        drop(Box::from_raw(t.manager_ctx as *mut Owned));
    }
}

/// Capsule destructor: a capsule still named `dltensor` was never consumed (a consumer
/// renames it `used_dltensor` and owns the tensor), so the tensor is freed here.
unsafe extern "C" fn capsule_destructor(cap: *mut ffi::PyObject) {
    // SAFETY: `cap` is the capsule being destroyed; IsValid with another name (a consumed
    // capsule) returns 0 without setting an error.
    unsafe {
        if ffi::PyCapsule_IsValid(cap, CAPSULE_NAME.as_ptr()) == 1 {
            let t = ffi::PyCapsule_GetPointer(cap, CAPSULE_NAME.as_ptr()) as *mut DLManagedTensor;
            deleter(t);
        }
    }
}

/// A C-contiguous bfloat16 array on the CPU, exported once through DLPack
/// (`torch.from_dlpack(a)`); `gradshard` returns torch tensors made from it.
#[pyclass(frozen, module = "gradshard._native")]
pub struct Bf16Array {
    data: Mutex<Option<(Vec<u16>, Vec<usize>)>>,
    shape: Vec<usize>,
}

impl Bf16Array {
    /// `bits`: bf16 bit patterns, row-major of `shape`.
    pub fn new(bits: Vec<u16>, shape: Vec<usize>) -> Bf16Array {
        debug_assert_eq!(bits.len(), shape.iter().product::<usize>());
        Bf16Array {
            data: Mutex::new(Some((bits, shape.clone()))),
            shape,
        }
    }
}

fn export(bits: Vec<u16>, shape: &[usize]) -> *mut DLManagedTensor {
    let shape_i: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape_i[i + 1];
    }
    let mut owned = Box::new(Owned {
        bits,
        shape: shape_i,
        strides,
    });
    let t = DLTensor {
        data: owned.bits.as_mut_ptr() as *mut c_void,
        device: DLDevice {
            device_type: KDL_CPU,
            device_id: 0,
        },
        ndim: owned.shape.len() as i32,
        dtype: DLDataType {
            code: KDL_BFLOAT,
            bits: 16,
            lanes: 1,
        },
        shape: owned.shape.as_mut_ptr(),
        strides: owned.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    Box::into_raw(Box::new(DLManagedTensor {
        dl_tensor: t,
        manager_ctx: Box::into_raw(owned) as *mut c_void,
        deleter: Some(deleter),
    }))
}

#[pymethods]
impl Bf16Array {
    /// The array's shape.
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// `(device type, device id)`: the CPU.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CPU, 0)
    }

    /// A `dltensor` capsule owning the values (the array can be exported once; the
    /// consumer gets the buffer without a copy).
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<&Bound<'py, PyAny>>,
        max_version: Option<&Bound<'py, PyAny>>,
        dl_device: Option<&Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let _ = (stream, max_version, dl_device, copy);
        let (bits, shape) = self
            .data
            .lock()
            .expect("bf16 array lock")
            .take()
            .ok_or_else(|| PyBufferError::new_err("this bf16 array was already exported"))?;
        let t = export(bits, &shape);
        let ptr = NonNull::new(t as *mut c_void).expect("Box pointers are not null");
        // SAFETY: `ptr` points at a live DLManagedTensor; `capsule_destructor` frees it
        // unless a consumer renamed the capsule and took ownership.
        let cap = unsafe {
            PyCapsule::new_with_pointer_and_destructor(
                py,
                ptr,
                CAPSULE_NAME,
                Some(capsule_destructor),
            )
        };
        if cap.is_err() {
            // SAFETY: the capsule was not made, so nothing else owns `t`.
            unsafe { deleter(t) };
        }
        cap
    }

    fn __repr__(&self) -> String {
        format!("gradshard._native.Bf16Array(shape={:?})", self.shape)
    }
}
