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
        // SAFETY: `self.0` points to a detoasted jsonb (constructor contract); its root container
        // follows the 4-byte varlena header.
        unsafe { container_text_len(std::ptr::addr_of!((*self.0).root).cast()) }
    }
}

const JB_FARRAY: u32 = 0x4000_0000;
const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
const JENTRY_TYPEMASK: u32 = 0x7000_0000;
const JENTRY_HAS_OFF: u32 = 0x8000_0000;
const JENTRY_ISSTRING: u32 = 0x0000_0000;
const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
const JENTRY_ISNULL: u32 = 0x4000_0000;

/// # Safety
/// `container` points to a valid `JsonbContainer` (jsonb.h) inside a detoasted jsonb.
unsafe fn container_text_len(container: *const u8) -> usize {
    // Deeply nested values recurse: PostgreSQL's own stack check raises ERROR, never a crash.
    // SAFETY: a plain check of the backend's stack depth.
    unsafe { pg_sys::check_stack_depth() };
    // SAFETY: the container header and its JEntry array are within the value (contract).
    let header = unsafe { container.cast::<u32>().read_unaligned() };
    let count = (header & JB_CMASK) as usize;
    let is_object = header & JB_FOBJECT != 0;
    let entries = if is_object { count * 2 } else { count };
    let children = container.wrapping_add(4).cast::<u32>();
    let data = container.wrapping_add(4 + 4 * entries);
    let mut total = 0usize;
    let mut start = 0usize;
    for i in 0..entries {
        // SAFETY: `i` < the number of JEntries the header declares.
        let entry = unsafe { children.add(i).read_unaligned() };
        let end = if entry & JENTRY_HAS_OFF != 0 {
            (entry & JENTRY_OFFLENMASK) as usize
        } else {
            start + (entry & JENTRY_OFFLENMASK) as usize
        };
        let aligned = data.wrapping_add((start + 3) & !3);
        total = total.saturating_add(match entry & JENTRY_TYPEMASK {
            JENTRY_ISSTRING => {
                // SAFETY: the string's bytes are [start, end) of the data area.
                let bytes = unsafe { std::slice::from_raw_parts(data.add(start), end - start) };
                string_text_len(bytes)
            }
            // SAFETY: a numeric varlena at the int-aligned offset (fillJsonbValue).
            JENTRY_ISNUMERIC => unsafe { numeric_text_len(aligned) },
            JENTRY_ISBOOL_FALSE => 5,
            JENTRY_ISBOOL_TRUE | JENTRY_ISNULL => 4,
            // SAFETY: a nested container at the int-aligned offset.
            _ => unsafe { container_text_len(aligned) },
        });
        start = end;
    }
    if header & JB_FSCALAR != 0 {
        // A raw scalar: a one-element array printed without brackets.
        return total;
    }
    debug_assert!(is_object || header & JB_FARRAY != 0);
    // "[a, b]" and "{k: v, k: v}", as JsonbToCString prints them.
    let separators = if is_object { 2 * count } else { 0 } + 2 * count.saturating_sub(1);
    total.saturating_add(2 + separators)
}

/// A string as `escape_json` prints it, quotes included.
fn string_text_len(bytes: &[u8]) -> usize {
    2 + bytes
        .iter()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// A numeric as `numeric_out` prints it (numeric.c, get_str_from_var).
///
/// # Safety
/// `numeric` points to a numeric varlena (1- or 4-byte header, not compressed).
unsafe fn numeric_text_len(numeric: *const u8) -> usize {
    // SAFETY: a varlena (contract).
    let (body, len) = unsafe {
        (
            pgrx::varlena::vardata_any(numeric.cast()).cast::<u8>(),
            pgrx::varlena::varsize_any_exhdr(numeric.cast()),
        )
    };
    if len < 2 {
        return 1;
    }
    // SAFETY: at least the 2-byte header is there.
    let n_header = unsafe { body.cast::<u16>().read_unaligned() };
    let (negative, dscale, weight, digits) = match n_header & 0xC000 {
        // NaN, Infinity, -Infinity (jsonb refuses them; counted generously).
        0xC000 => return 9,
        0x8000 => {
            let weight = if n_header & 0x0040 != 0 {
                i32::from(n_header & 0x003F) - 64
            } else {
                i32::from(n_header & 0x003F)
            };
            (
                n_header & 0x2000 != 0,
                usize::from((n_header & 0x1F80) >> 7),
                weight,
                2,
            )
        }
        sign => {
            if len < 4 {
                return 1;
            }
            // SAFETY: the long form's weight follows the sign and scale.
            let weight = unsafe { body.add(2).cast::<i16>().read_unaligned() };
            (
                sign == 0x4000,
                usize::from(n_header & 0x3FFF),
                i32::from(weight),
                4,
            )
        }
    };
    let first = if len >= digits + 2 {
        // SAFETY: the first base-10000 digit follows the header.
        unsafe { body.add(digits).cast::<u16>().read_unaligned() }
    } else {
        0
    };
    let integral = if weight < 0 {
        1
    } else {
        let leading = match first {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            _ => 4,
        };
        leading + 4 * weight as usize
    };
    usize::from(negative) + integral + if dscale > 0 { 1 + dscale } else { 0 }
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
