//! The JSON text `jsonb_out` prints for a jsonb value, read from its binary form: its length
//! (the size cap counts what is sent, without printing gigabytes first) and the text itself
//! (the wal envelope, printed straight into the envelope's buffer). One walk serves both, so the
//! length is the printed length by construction; `tests.rs` compares both with `jsonb_out`.
//!
//! The format is `JsonbToCString`'s (jsonb.c): `", "` between elements, `": "` after a key,
//! strings escaped by `escape_json`, numbers by `numeric_out`; a raw scalar without brackets.

use pgrx::pg_sys;

pub const JB_CMASK: u32 = 0x0FFF_FFFF;
pub const JB_FSCALAR: u32 = 0x1000_0000;
pub const JB_FOBJECT: u32 = 0x2000_0000;
pub const JENTRY_OFFLENMASK: u32 = 0x0FFF_FFFF;
pub const JENTRY_TYPEMASK: u32 = 0x7000_0000;
pub const JENTRY_HAS_OFF: u32 = 0x8000_0000;
pub const JENTRY_ISSTRING: u32 = 0x0000_0000;
pub const JENTRY_ISNUMERIC: u32 = 0x1000_0000;
pub const JENTRY_ISBOOL_FALSE: u32 = 0x2000_0000;
pub const JENTRY_ISBOOL_TRUE: u32 = 0x3000_0000;
pub const JENTRY_ISNULL: u32 = 0x4000_0000;

/// Where the walk's text goes.
pub trait Out {
    fn bytes(&mut self, bytes: &[u8]);
    fn string(&mut self, bytes: &[u8]);
    fn numeric(&mut self, numeric: &Numeric<'_>);
}

/// Counts the bytes (saturating: a count past memory is still "too large").
pub struct Count(pub usize);

impl Out for Count {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(bytes.len());
    }
    fn string(&mut self, bytes: &[u8]) {
        self.0 = self.0.saturating_add(2 + bytes.len() + escape_extra(bytes));
    }
    fn numeric(&mut self, numeric: &Numeric<'_>) {
        self.0 = self.0.saturating_add(numeric.text_len());
    }
}

/// Appends the text (in the server encoding, as the value stores it). The caller reserves the
/// counted length first, so nothing here allocates.
pub struct Print<'a>(pub &'a mut Vec<u8>);

impl Out for Print<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn string(&mut self, bytes: &[u8]) {
        self.0.push(b'"');
        if escape_extra(bytes) == 0 {
            self.0.extend_from_slice(bytes);
        } else {
            for &byte in bytes {
                match byte {
                    b'"' => self.0.extend_from_slice(b"\\\""),
                    b'\\' => self.0.extend_from_slice(b"\\\\"),
                    b'\n' => self.0.extend_from_slice(b"\\n"),
                    b'\r' => self.0.extend_from_slice(b"\\r"),
                    b'\t' => self.0.extend_from_slice(b"\\t"),
                    0x08 => self.0.extend_from_slice(b"\\b"),
                    0x0c => self.0.extend_from_slice(b"\\f"),
                    0..=0x1f => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        self.0.extend_from_slice(b"\\u00");
                        self.0.push(HEX[usize::from(byte >> 4)]);
                        self.0.push(HEX[usize::from(byte & 0xf)]);
                    }
                    _ => self.0.push(byte),
                }
            }
        }
        self.0.push(b'"');
    }
    fn numeric(&mut self, numeric: &Numeric<'_>) {
        numeric.print(self.0);
    }
}

/// How many bytes `escape_json` adds to each byte: 1 for `"`, `\\` and the five control
/// characters with a short escape, 5 for the other control characters (`\u00XX`), else 0.
const ESCAPE_EXTRA: [u8; 256] = {
    let mut extra = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        extra[byte] = 5;
        byte += 1;
    }
    extra[b'"' as usize] = 1;
    extra[b'\\' as usize] = 1;
    extra[0x08] = 1;
    extra[0x0c] = 1;
    extra[b'\n' as usize] = 1;
    extra[b'\r' as usize] = 1;
    extra[b'\t' as usize] = 1;
    extra
};

/// How many bytes `escape_json` adds to `bytes` (quotes not counted): one table lookup per byte
/// (JSON strings are mostly short, where a vectorised scan costs more than it saves).
fn escape_extra(bytes: &[u8]) -> usize {
    let mut extra = 0usize;
    for &byte in bytes {
        extra += usize::from(ESCAPE_EXTRA[usize::from(byte)]);
    }
    extra
}

/// Walks the value whose root container is at `root`, writing its text to `out`.
///
/// # Safety
/// `root` points to a valid `JsonbContainer` (jsonb.h) inside a detoasted jsonb.
pub unsafe fn walk(root: *const u8, out: &mut impl Out) {
    // SAFETY: the contract.
    unsafe { container(root, 0, out) };
}

/// # Safety
/// `container` points to a valid `JsonbContainer` inside a detoasted jsonb.
unsafe fn container(container: *const u8, depth: u32, out: &mut impl Out) {
    // Deeply nested values recurse: PostgreSQL's own stack check raises ERROR, never a crash.
    // Every 8th level: each check is a guarded call into the server, and 8 of these frames are
    // far less than the margin PostgreSQL keeps below the stack's end.
    if depth.is_multiple_of(8) {
        // SAFETY: a plain check of the backend's stack depth.
        unsafe { pg_sys::check_stack_depth() };
    }
    // SAFETY: the container header and its JEntry array are within the value (contract).
    let header = unsafe { container.cast::<u32>().read_unaligned() };
    let count = (header & JB_CMASK) as usize;
    let children = container.wrapping_add(4).cast::<u32>();
    if header & JB_FOBJECT != 0 {
        let data = container.wrapping_add(4 + 8 * count);
        // Keys are the first `count` entries, values the next `count`, stored back to back:
        // one cursor each, the values' starting where the last key ends.
        let mut keys = Cursor::new(children, 0, 0);
        for _ in 0..count {
            keys.next_entry();
        }
        let mut values = Cursor::new(children, count, keys.start);
        let mut keys = Cursor::new(children, 0, 0);
        out.bytes(b"{");
        for i in 0..count {
            if i > 0 {
                out.bytes(b", ");
            }
            let (entry, start, end) = keys.next_entry();
            // SAFETY: a key is a string entry of the container.
            unsafe { value(entry, data, start, end, depth, out) };
            out.bytes(b": ");
            let (entry, start, end) = values.next_entry();
            // SAFETY: an entry of the container.
            unsafe { value(entry, data, start, end, depth, out) };
        }
        out.bytes(b"}");
    } else {
        let data = container.wrapping_add(4 + 4 * count);
        let raw_scalar = header & JB_FSCALAR != 0;
        let mut elements = Cursor::new(children, 0, 0);
        if !raw_scalar {
            out.bytes(b"[");
        }
        for i in 0..count {
            if i > 0 {
                out.bytes(b", ");
            }
            let (entry, start, end) = elements.next_entry();
            // SAFETY: an entry of the container.
            unsafe { value(entry, data, start, end, depth, out) };
        }
        if !raw_scalar {
            out.bytes(b"]");
        }
    }
}

/// Reads consecutive JEntries: each stores its end offset (every 32nd) or its length.
struct Cursor {
    children: *const u32,
    index: usize,
    start: usize,
}

impl Cursor {
    fn new(children: *const u32, index: usize, start: usize) -> Cursor {
        Cursor {
            children,
            index,
            start,
        }
    }

    /// The next JEntry and its value's [start, end) in the data area.
    fn next_entry(&mut self) -> (u32, usize, usize) {
        // SAFETY: callers read only as many entries as the container header declares.
        let entry = unsafe { self.children.add(self.index).read_unaligned() };
        let start = self.start;
        let end = if entry & JENTRY_HAS_OFF != 0 {
            (entry & JENTRY_OFFLENMASK) as usize
        } else {
            start + (entry & JENTRY_OFFLENMASK) as usize
        };
        self.index += 1;
        self.start = end;
        (entry, start, end)
    }
}

/// # Safety
/// `entry` is a JEntry of the container whose data area starts at `data`, its value at
/// `[start, end)`.
unsafe fn value(
    entry: u32,
    data: *const u8,
    start: usize,
    end: usize,
    depth: u32,
    out: &mut impl Out,
) {
    // Numbers and nested containers start at the next 4-byte boundary (fillJsonbValue).
    let aligned = data.wrapping_add((start + 3) & !3);
    match entry & JENTRY_TYPEMASK {
        JENTRY_ISSTRING => {
            // SAFETY: the string's bytes are [start, end) of the data area.
            out.string(unsafe { std::slice::from_raw_parts(data.add(start), end - start) });
        }
        // SAFETY: a numeric varlena at the aligned offset.
        JENTRY_ISNUMERIC => out.numeric(&unsafe { Numeric::read(aligned) }),
        JENTRY_ISBOOL_FALSE => out.bytes(b"false"),
        JENTRY_ISBOOL_TRUE => out.bytes(b"true"),
        JENTRY_ISNULL => out.bytes(b"null"),
        // SAFETY: a nested container at the aligned offset.
        _ => unsafe { container(aligned, depth + 1, out) },
    }
}

/// A numeric as stored (numeric.c): sign, weight of the first base-10000 digit, display scale,
/// and the digits.
pub struct Numeric<'a> {
    negative: bool,
    weight: i32,
    dscale: usize,
    /// Base-10000 digits, native-endian `u16` each (read unaligned).
    digits: &'a [u8],
}

impl Numeric<'_> {
    /// # Safety
    /// `numeric` points to a numeric varlena (1- or 4-byte header, not compressed).
    unsafe fn read<'a>(numeric: *const u8) -> Numeric<'a> {
        // SAFETY: a varlena (contract).
        let body = unsafe {
            std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(numeric.cast()).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(numeric.cast()),
            )
        };
        let zero = Numeric {
            negative: false,
            weight: 0,
            dscale: 0,
            digits: &[],
        };
        if body.len() < 2 {
            return zero;
        }
        let n_header = u16::from_ne_bytes([body[0], body[1]]);
        let (negative, dscale, weight, header_len) = match n_header & 0xC000 {
            // NaN and infinities: jsonb refuses them.
            0xC000 => return zero,
            // The short form: sign, scale and weight in the 2-byte header.
            0x8000 => {
                let weight = i32::from(n_header & 0x003F);
                (
                    n_header & 0x2000 != 0,
                    usize::from((n_header & 0x1F80) >> 7),
                    if n_header & 0x0040 != 0 {
                        weight - 64
                    } else {
                        weight
                    },
                    2,
                )
            }
            sign => {
                if body.len() < 4 {
                    return zero;
                }
                (
                    sign == 0x4000,
                    usize::from(n_header & 0x3FFF),
                    i32::from(i16::from_ne_bytes([body[2], body[3]])),
                    4,
                )
            }
        };
        Numeric {
            negative,
            weight,
            dscale,
            digits: &body[header_len..],
        }
    }

    fn ndigits(&self) -> i32 {
        (self.digits.len() / 2) as i32
    }

    /// Base-10000 digit `i` (0 is the first), 0 outside the stored ones.
    fn digit(&self, i: i32) -> u16 {
        if i < 0 || i >= self.ndigits() {
            return 0;
        }
        let at = 2 * i as usize;
        u16::from_ne_bytes([self.digits[at], self.digits[at + 1]])
    }

    fn text_len(&self) -> usize {
        let integral = if self.weight < 0 {
            1
        } else {
            let leading = match self.digit(0) {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                _ => 4,
            };
            leading + 4 * self.weight as usize
        };
        usize::from(self.negative) + integral + if self.dscale > 0 { 1 + self.dscale } else { 0 }
    }

    /// As `get_str_from_var` (numeric.c) prints it.
    fn print(&self, out: &mut Vec<u8>) {
        if self.negative {
            out.push(b'-');
        }
        let mut d;
        if self.weight < 0 {
            d = self.weight + 1;
            out.push(b'0');
        } else {
            d = 0;
            while d <= self.weight {
                let digits = four_digits(self.digit(d));
                // The first digit without its leading zeros.
                let skip = if d == 0 {
                    digits.iter().take(3).take_while(|&&c| c == b'0').count()
                } else {
                    0
                };
                out.extend_from_slice(&digits[skip..]);
                d += 1;
            }
        }
        if self.dscale > 0 {
            out.push(b'.');
            let end = out.len() + self.dscale;
            let mut written = 0;
            while written < self.dscale {
                out.extend_from_slice(&four_digits(self.digit(d)));
                d += 1;
                written += 4;
            }
            out.truncate(end);
        }
    }
}

fn four_digits(digit: u16) -> [u8; 4] {
    [
        b'0' + (digit / 1000 % 10) as u8,
        b'0' + (digit / 100 % 10) as u8,
        b'0' + (digit / 10 % 10) as u8,
        b'0' + (digit % 10) as u8,
    ]
}
