//! Reading `jsonb` datums without converting them to `serde_json` values: the payload passes
//! through untouched in table mode and is printed once in wal mode.

use pgrx::pg_sys;
use std::ffi::CStr;

use crate::varlena::server_to_utf8;

const JB_CMASK: u32 = 0x0FFF_FFFF;
const JB_FSCALAR: u32 = 0x1000_0000;
const JB_FOBJECT: u32 = 0x2000_0000;

/// A detoasted `jsonb` value, valid for the current memory context.
pub struct Jsonb(*mut pg_sys::Jsonb);

impl Jsonb {
    /// # Safety
    /// `datum` must be a non-NULL `jsonb` datum.
    pub unsafe fn from_datum(datum: pg_sys::Datum) -> Self {
        // SAFETY: a non-NULL jsonb datum (contract); the detoasted copy lives in the current
        // memory context, which outlives the call that reads it.
        Jsonb(unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) }.cast())
    }

    pub fn datum(&self) -> pg_sys::Datum {
        pg_sys::Datum::from(self.0)
    }

    fn header(&self) -> u32 {
        // SAFETY: `self.0` points to a detoasted jsonb (constructor contract).
        unsafe { (*self.0).root.header }
    }

    pub fn is_object(&self) -> bool {
        self.header() & JB_FOBJECT != 0
    }

    pub fn is_empty_object(&self) -> bool {
        self.is_object() && self.header() & JB_CMASK == 0
    }

    /// "object", "array" or "scalar", for error messages.
    pub fn kind(&self) -> &'static str {
        match self.header() {
            h if h & JB_FOBJECT != 0 => "object",
            h if h & JB_FSCALAR != 0 => "scalar",
            _ => "array",
        }
    }

    /// The value as JSON text, exactly as `jsonb_out` prints it, converted to UTF-8.
    pub fn to_text(&self) -> String {
        // SAFETY: `self.0` is a detoasted jsonb; JsonbToCString returns a palloc'd C string in
        // the server encoding, copied (and converted) before it is freed.
        unsafe {
            let size = pgrx::varlena::varsize_any_exhdr(self.0.cast()) as i32;
            let text = pg_sys::JsonbToCString(std::ptr::null_mut(), &mut (*self.0).root, size);
            let owned = server_to_utf8(CStr::from_ptr(text).to_bytes()).into_owned();
            pg_sys::pfree(text.cast());
            owned
        }
    }
}

/// `'{}'::jsonb`, for a NULL headers argument.
pub fn empty_object() -> pg_sys::Datum {
    // SAFETY: jsonb_in with a constant, valid, NUL-terminated JSON text.
    unsafe {
        pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(c"{}".as_ptr()))],
        )
        .expect("jsonb_in('{}') returns a value")
    }
}
