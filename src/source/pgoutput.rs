//! Decoder for pgoutput (protocol version 1) logical replication messages.
//! Begin/Commit/Message are parsed by `pgwire-replication`; the rest is decoded here.

use bytes::Bytes;

/// One column value in a tuple.
#[derive(Debug, Clone, PartialEq)]
pub enum Datum {
    Null,
    /// Text representation (pgoutput sends text unless `binary` is requested).
    Text(Bytes),
    /// An unchanged TOASTed value: the update did not touch it and it is not sent.
    UnchangedToast,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Relation {
        oid: u32,
        namespace: String,
        name: String,
        columns: Vec<RelationColumn>,
    },
    Insert {
        rel: u32,
        new: Vec<Datum>,
    },
    Update {
        rel: u32,
        /// Old key ('K') or old full row ('O'), sent only when the key changed or with
        /// REPLICA IDENTITY FULL.
        old: Option<Vec<Datum>>,
        new: Vec<Datum>,
    },
    Delete {
        rel: u32,
        old: Vec<Datum>,
    },
    Truncate {
        rels: Vec<u32>,
    },
    /// Begin, Commit, Type, Origin, Message: handled elsewhere or not needed.
    Other(u8),
}

#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message ({tag}): {what}")]
pub struct DecodeError {
    pub tag: char,
    pub what: String,
}

struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, what: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            tag: self.tag as char,
            what: what.into(),
        })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < self.pos + n {
            return self.fail(format!("truncated at byte {}", self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return self.fail("unterminated string");
        };
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.i16()?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            match self.u8()? {
                b'n' => out.push(Datum::Null),
                b'u' => out.push(Datum::UnchangedToast),
                b't' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return self.fail("negative value length");
                    }
                    let start = self.pos;
                    self.take(len as usize)?;
                    out.push(Datum::Text(self.buf.slice(start..start + len as usize)));
                }
                b'b' => return self.fail("binary values are not requested and not supported"),
                k => return self.fail(format!("unknown tuple value kind {k}")),
            }
        }
        Ok(out)
    }
}

/// Decodes one pgoutput message. Values are zero-copy slices of `buf`.
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            tag: '?',
            what: "empty message".into(),
        });
    };
    let mut r = Reader { buf, pos: 1, tag };
    Ok(match tag {
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replident = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let typmod = r.i32()?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    typmod,
                });
            }
            Message::Relation {
                oid,
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                columns,
            }
        }
        b'I' => {
            let rel = r.u32()?;
            if r.u8()? != b'N' {
                return r.fail("insert without new tuple");
            }
            Message::Insert {
                rel,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return r.fail("update without new tuple");
            }
            Message::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return r.fail("delete without old tuple");
            }
            Message::Delete {
                rel,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut rels = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Truncate { rels }
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_relation_insert_update_delete_truncate() {
        let mut rel = vec![b'R'];
        rel.extend(16385u32.to_be_bytes());
        rel.extend(b"public\0user\0");
        rel.push(b'd');
        rel.extend(2i16.to_be_bytes());
        rel.push(1);
        rel.extend(b"id\0");
        rel.extend(23u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        rel.push(0);
        rel.extend(b"first_name\0");
        rel.extend(1043u32.to_be_bytes());
        rel.extend((-1i32).to_be_bytes());
        match decode(&Bytes::from(rel)).unwrap() {
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
            } => {
                assert_eq!(
                    (oid, namespace.as_str(), name.as_str()),
                    (16385, "public", "user")
                );
                assert!(columns[0].is_key && !columns[1].is_key);
                assert_eq!(columns[1].type_oid, 1043);
            }
            m => panic!("{m:?}"),
        }

        let mut ins = vec![b'I'];
        ins.extend(16385u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(tuple(&[Some("7"), Some("Jüri")]));
        let m = decode(&Bytes::from(ins)).unwrap();
        assert_eq!(
            m,
            Message::Insert {
                rel: 16385,
                new: vec![Datum::Text("7".into()), Datum::Text("Jüri".into())]
            }
        );

        let mut upd = vec![b'U'];
        upd.extend(16385u32.to_be_bytes());
        upd.push(b'K');
        upd.extend(tuple(&[Some("7"), None]));
        upd.push(b'N');
        let mut new = tuple(&[Some("8")]);
        new[1] = 2; // two columns: "8", then an unchanged TOAST value
        new.push(b'u');
        upd.extend(new);
        match decode(&Bytes::from(upd)).unwrap() {
            Message::Update {
                old: Some(old),
                new,
                ..
            } => {
                assert_eq!(old, vec![Datum::Text("7".into()), Datum::Null]);
                assert_eq!(new, vec![Datum::Text("8".into()), Datum::UnchangedToast]);
            }
            m => panic!("{m:?}"),
        }

        let mut del = vec![b'D'];
        del.extend(16385u32.to_be_bytes());
        del.push(b'K');
        del.extend(tuple(&[Some("8"), None]));
        assert!(matches!(
            decode(&Bytes::from(del)).unwrap(),
            Message::Delete { rel: 16385, .. }
        ));

        let mut tr = vec![b'T'];
        tr.extend(2i32.to_be_bytes());
        tr.push(0);
        tr.extend(1u32.to_be_bytes());
        tr.extend(2u32.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(tr)).unwrap(),
            Message::Truncate { rels: vec![1, 2] }
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for bad in [
            &b"I\0\0"[..],
            b"U\0\0\0\x01N\0\x01t\0\0\0\x09ab",
            b"R\0\0\0\x01pub",
            b"",
        ] {
            assert!(decode(&Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
