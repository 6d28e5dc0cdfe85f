//! One message as publish hands it to a writer (`table.rs`, `wal.rs`): a leaf, so that the
//! writers and the dispatcher (`storage.rs`) all import it from below.

use crate::jsonb::Jsonb;
use crate::varlena::Varlena;
use pgrx::pg_sys;

pub enum Payload<'a> {
    /// A jsonb value and the length of its JSON text, as the size rule counted it.
    Json {
        value: Jsonb,
        text_len: usize,
    },
    Bytes(Varlena<'a>),
}

pub struct Message<'a> {
    pub id: uuid::Uuid,
    /// Validated: ASCII `[A-Za-z0-9._-]`.
    pub queue: Varlena<'a>,
    /// Server encoding.
    pub key: Option<Varlena<'a>>,
    pub headers: Jsonb,
    /// The headers' JSON text length, as the size rule counted it.
    pub headers_text_len: usize,
    pub payload: Payload<'a>,
    pub created_at: pg_sys::TimestampTz,
}
