//! A decoder for the pgoutput (protocol version 1) messages the worker needs: Relation and Insert.
//!
//! Begin, Commit and logical decoding Message are decoded by `pgwire-replication` itself, which
//! hands over every other `XLogData` payload raw. Updates, deletes, truncates, type and origin
//! messages are skipped: the publication publishes inserts only and the outbox table is
//! insert-only. Reference: "Logical Replication Message Formats" in the PostgreSQL manual.

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
#[error("malformed pgoutput {message} message: {problem}")]
pub struct ProtocolError {
    message: &'static str,
    problem: String,
}

impl ProtocolError {
    pub fn unknown_relation(id: u32) -> Self {
        ProtocolError {
            message: "Insert",
            problem: format!("relation {id} was not announced by a Relation message"),
        }
    }
}

/// A relation's columns, as announced before its first change in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// One column value of a tuple, in text format.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value (only in updates; never expected for inserts).
    Unchanged,
    Text(Vec<u8>),
}

#[derive(Debug, PartialEq)]
pub enum Change {
    Relation(Relation),
    Insert {
        relation: u32,
        values: Vec<Value>,
    },
    /// Anything else: not needed to read the outbox.
    Other(u8),
}

pub fn decode(data: &[u8]) -> Result<Change, ProtocolError> {
    let Some((&tag, body)) = data.split_first() else {
        return Err(ProtocolError {
            message: "(empty)",
            problem: "no message type byte".into(),
        });
    };
    match tag {
        b'R' => decode_relation(&mut Reader::new("Relation", body)).map(Change::Relation),
        b'I' => decode_insert(&mut Reader::new("Insert", body)),
        other => Ok(Change::Other(other)),
    }
}

fn decode_relation(r: &mut Reader<'_>) -> Result<Relation, ProtocolError> {
    let id = r.u32()?;
    let namespace = r.cstring()?;
    let name = r.cstring()?;
    let _replica_identity = r.u8()?;
    let count = r.i16()?;
    let mut columns = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let _flags = r.u8()?;
        columns.push(r.cstring()?);
        let _type_oid = r.u32()?;
        let _type_modifier = r.u32()?;
    }
    Ok(Relation {
        id,
        namespace,
        name,
        columns,
    })
}

fn decode_insert(r: &mut Reader<'_>) -> Result<Change, ProtocolError> {
    let relation = r.u32()?;
    let marker = r.u8()?;
    if marker != b'N' {
        return Err(r.error(format!(
            "expected new tuple marker 'N', found {marker:#04x}"
        )));
    }
    let count = r.i16()?;
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        values.push(match r.u8()? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.u32()? as usize;
                Value::Text(r.bytes(len)?.to_vec())
            }
            b'b' => return Err(r.error("binary column values are not requested".into())),
            kind => return Err(r.error(format!("unknown column kind {kind:#04x}"))),
        });
    }
    Ok(Change::Insert { relation, values })
}

/// A cursor over a message body whose errors name the message being read.
struct Reader<'a> {
    message: &'static str,
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(message: &'static str, rest: &'a [u8]) -> Self {
        Reader { message, rest }
    }

    fn error(&self, problem: String) -> ProtocolError {
        ProtocolError {
            message: self.message,
            problem,
        }
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        if self.rest.len() < len {
            return Err(self.error(format!(
                "truncated: needed {len} more bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }

    fn cstring(&mut self) -> Result<String, ProtocolError> {
        let Some(end) = self.rest.iter().position(|&b| b == 0) else {
            return Err(self.error("unterminated string".into()));
        };
        let text = String::from_utf8_lossy(&self.rest[..end]).into_owned();
        self.rest = &self.rest[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from PostgreSQL 15 (`pg_logical_slot_peek_binary_changes` with pgoutput,
    /// proto_version 1) after `SELECT outbox.publish('orders', '{"n": 1}', '{}', 'k-1')`.
    const RELATION: &str = include_str!("testdata/relation.hex");
    const INSERT: &str = include_str!("testdata/insert.hex");

    fn unhex(text: &str) -> Vec<u8> {
        let text = text.trim();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn decodes_a_captured_relation() {
        let Change::Relation(relation) = decode(&unhex(RELATION)).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(
            (relation.namespace.as_str(), relation.name.as_str()),
            ("outbox", "messages")
        );
        assert_eq!(
            relation.columns,
            [
                "id",
                "queue",
                "key",
                "payload",
                "payload_bytes",
                "headers",
                "created_at"
            ]
        );
    }

    #[test]
    fn decodes_a_captured_insert() {
        let Change::Relation(relation) = decode(&unhex(RELATION)).unwrap() else {
            panic!("not a relation");
        };
        let Change::Insert {
            relation: id,
            values,
        } = decode(&unhex(INSERT)).unwrap()
        else {
            panic!("not an insert");
        };
        assert_eq!(id, relation.id);
        assert_eq!(values.len(), 7);
        assert_eq!(values[1], Value::Text(b"orders".to_vec()));
        assert_eq!(values[2], Value::Text(b"k-1".to_vec()));
        assert_eq!(values[3], Value::Text(br#"{"n": 1}"#.to_vec()));
        assert_eq!(values[4], Value::Null);
        assert_eq!(values[5], Value::Text(b"{}".to_vec()));
    }

    #[test]
    fn skips_other_messages() {
        assert_eq!(decode(b"Yxxxx").unwrap(), Change::Other(b'Y'));
        assert_eq!(decode(b"U").unwrap(), Change::Other(b'U'));
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let insert = unhex(INSERT);
        for len in 0..insert.len() {
            if len == 0 {
                assert!(decode(&insert[..len]).is_err());
                continue;
            }
            let err = decode(&insert[..len]).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("malformed pgoutput Insert message"),
                "{err}"
            );
        }
        let err = decode(&unhex(RELATION)[..10]).unwrap_err();
        assert!(err.to_string().contains("Relation"), "{err}");
    }

    #[test]
    fn rejects_an_unknown_column_kind() {
        let err = decode(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b'x']).unwrap_err();
        assert!(
            err.to_string().contains("unknown column kind 0x78"),
            "{err}"
        );
    }
}
