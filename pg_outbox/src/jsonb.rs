//! Reading `jsonb` datums without converting them to `serde_json` values: the payload passes
//! through untouched in table mode and is printed once in wal mode.

use pgrx::pg_sys;
use std::ffi::CStr;

use crate::json_text::{
    self, JB_CMASK, JB_FOBJECT, JB_FSCALAR, JENTRY_HAS_OFF, JENTRY_ISNULL, JENTRY_ISSTRING,
    JENTRY_OFFLENMASK, JENTRY_TYPEMASK,
};
use crate::varlena::server_to_utf8;

/// A detoasted `jsonb` value, valid for the current memory context.
/// Clone copies the pointer, not the value.
#[derive(Clone)]
pub struct Jsonb(*mut pg_sys::Jsonb);

impl Jsonb {
    /// # Safety
    /// `datum` must be a non-NULL `jsonb` datum.
    pub unsafe fn from_datum(datum: pg_sys::Datum) -> Self {
        let value = datum.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: a non-NULL varlena (contract). A plain value (4-byte header, neither compressed
        // nor a TOAST pointer: a payload of usual size) is read in place; any other is detoasted
        // into the current memory context, which outlives the call that reads it.
        unsafe {
            if pgrx::varlena::varatt_is_4b_u(value) {
                return Jsonb(value.cast());
            }
            Jsonb(pg_sys::pg_detoast_datum(value).cast())
        }
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

    /// The JSON value `null` (a raw scalar), not SQL NULL.
    pub fn is_json_null(&self) -> bool {
        // SAFETY: a scalar's container has exactly one JEntry after its header.
        self.header() & JB_FSCALAR != 0
            && unsafe { (*self.0).root.children.as_ptr().read_unaligned() } & JENTRY_TYPEMASK
                == JENTRY_ISNULL
    }

    /// "object", "array" or "scalar", for error messages.
    pub fn kind(&self) -> &'static str {
        match self.header() {
            h if h & JB_FOBJECT != 0 => "object",
            h if h & JB_FSCALAR != 0 => "scalar",
            _ => "array",
        }
    }

    /// The value as JSON text, exactly as `jsonb_out` prints it, converted to UTF-8. Printed
    /// into palloc'd memory of the current memory context (an allocation failure is an ERROR,
    /// never an abort), where it stays until the context is reset: no copy on the Rust heap.
    pub fn to_text(&self) -> std::borrow::Cow<'_, str> {
        // SAFETY: `self.0` is a detoasted jsonb; JsonbToCString returns a palloc'd C string in
        // the server encoding, valid as long as the current memory context, like `self`.
        unsafe {
            let size = pgrx::varlena::varsize_any_exhdr(self.0.cast()) as i32;
            let text = pg_sys::JsonbToCString(std::ptr::null_mut(), &mut (*self.0).root, size);
            server_to_utf8(CStr::from_ptr(text).to_bytes())
        }
    }

    /// Whether this is a JSON object whose values are all strings, with no empty name and no
    /// name starting with `outbox-` (any case): read from the binary form, allocating nothing.
    pub fn is_valid_headers(&self) -> bool {
        if !self.is_object() {
            return false;
        }
        // SAFETY: a detoasted jsonb (constructor contract).
        let container: *const u8 = unsafe { std::ptr::addr_of!((*self.0).root) }.cast();
        let count = (self.header() & JB_CMASK) as usize;
        let children = container.wrapping_add(4).cast::<u32>();
        let data = container.wrapping_add(4 + 8 * count);
        let mut start = 0usize;
        for i in 0..2 * count {
            // SAFETY: `i` < the number of JEntries of an object of `count` pairs.
            let entry = unsafe { children.add(i).read_unaligned() };
            let end = if entry & JENTRY_HAS_OFF != 0 {
                (entry & JENTRY_OFFLENMASK) as usize
            } else {
                start + (entry & JENTRY_OFFLENMASK) as usize
            };
            if i < count {
                // SAFETY: a key: the string's bytes are [start, end) of the data area.
                let name = unsafe { std::slice::from_raw_parts(data.add(start), end - start) };
                if name.is_empty()
                    || (name.len() >= 7 && name[..7].eq_ignore_ascii_case(b"outbox-"))
                {
                    return false;
                }
            } else if entry & JENTRY_TYPEMASK != JENTRY_ISSTRING {
                return false;
            }
            start = end;
        }
        true
    }
}

impl Jsonb {
    /// The length in bytes of the JSON text `jsonb_out` prints for this value (what pgoutput and
    /// the wal envelope carry), computed from the binary form without printing it: a jsonb of a
    /// few kilobytes can print as gigabytes (a number like `1e131071` is stored in a few bytes
    /// and printed with 131,072 digits).
    pub fn text_len(&self) -> usize {
        let mut count = json_text::Count(0);
        // SAFETY: `self.0` points to a detoasted jsonb (constructor contract); its root container
        // follows the 4-byte varlena header.
        unsafe { json_text::walk(self.root(), &mut count) };
        count.0
    }

    /// Appends the JSON text `jsonb_out` prints, in the server encoding, to `out`, which must
    /// have room for `text_len()` bytes and 3 more (so that nothing here allocates).
    pub fn print_text(&self, out: &mut Vec<u8>) {
        // SAFETY: as in `text_len`.
        unsafe { json_text::walk(self.root(), &mut json_text::Print(out)) };
    }

    fn root(&self) -> *const u8 {
        // SAFETY: `self.0` points to a detoasted jsonb (constructor contract).
        unsafe { std::ptr::addr_of!((*self.0).root) }.cast()
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
