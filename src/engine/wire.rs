//! Protocol-buffers wire format, read and written field by field without a schema.
//!
//! Just enough to edit an ONNX model in place: a message is its fields in file order, and
//! writing it back gives the same bytes, so every field the editor does not touch (metadata,
//! attributes, fields of newer ONNX versions) survives unchanged.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    #[error("truncated message at byte {0}")]
    Truncated(usize),
    #[error("varint too long at byte {0}")]
    VarintTooLong(usize),
    #[error("unsupported wire type {wire_type} at byte {at}")]
    WireType { wire_type: u64, at: usize },
    #[error("field {0} is not valid UTF-8")]
    Utf8(u32),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    /// Length-delimited: a string, bytes, a nested message or a packed repeated field.
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub number: u32,
    pub value: Value,
}

impl Field {
    pub fn bytes(number: u32, bytes: impl Into<Vec<u8>>) -> Field {
        Field { number, value: Value::Bytes(bytes.into()) }
    }

    pub fn varint(number: u32, v: u64) -> Field {
        Field { number, value: Value::Varint(v) }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub fields: Vec<Field>,
}

impl Message {
    pub fn parse(buf: &[u8]) -> Result<Message, WireError> {
        let mut fields = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let tag = read_varint(buf, &mut at)?;
            let number = (tag >> 3) as u32;
            let value = match tag & 7 {
                0 => Value::Varint(read_varint(buf, &mut at)?),
                1 => Value::Fixed64(u64::from_le_bytes(take(buf, &mut at, 8)?.try_into().expect("8 bytes"))),
                2 => {
                    let len = read_varint(buf, &mut at)?;
                    let len = usize::try_from(len).map_err(|_| WireError::Truncated(at))?;
                    Value::Bytes(take(buf, &mut at, len)?.to_vec())
                }
                5 => Value::Fixed32(u32::from_le_bytes(take(buf, &mut at, 4)?.try_into().expect("4 bytes"))),
                wire_type => return Err(WireError::WireType { wire_type, at }),
            };
            fields.push(Field { number, value });
        }
        Ok(Message { fields })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for f in &self.fields {
            let number = u64::from(f.number) << 3;
            match &f.value {
                Value::Varint(v) => {
                    write_varint(&mut out, number);
                    write_varint(&mut out, *v);
                }
                Value::Fixed64(v) => {
                    write_varint(&mut out, number | 1);
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bytes(b) => {
                    write_varint(&mut out, number | 2);
                    write_varint(&mut out, b.len() as u64);
                    out.extend_from_slice(b);
                }
                Value::Fixed32(v) => {
                    write_varint(&mut out, number | 5);
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }

    /// Every length-delimited field `number`, in order.
    pub fn all_bytes(&self, number: u32) -> impl Iterator<Item = &[u8]> {
        self.fields.iter().filter(move |f| f.number == number).filter_map(|f| match &f.value {
            Value::Bytes(b) => Some(b.as_slice()),
            _ => None,
        })
    }

    /// The last occurrence of a length-delimited field (protobuf's rule for singular fields).
    pub fn bytes(&self, number: u32) -> Option<&[u8]> {
        self.all_bytes(number).last()
    }

    pub fn string(&self, number: u32) -> Result<Option<&str>, WireError> {
        self.bytes(number).map(|b| std::str::from_utf8(b).map_err(|_| WireError::Utf8(number))).transpose()
    }

    pub fn strings(&self, number: u32) -> Result<Vec<String>, WireError> {
        self.all_bytes(number)
            .map(|b| std::str::from_utf8(b).map(str::to_owned).map_err(|_| WireError::Utf8(number)))
            .collect()
    }

    pub fn varint(&self, number: u32) -> Option<u64> {
        self.fields.iter().rev().find(|f| f.number == number).and_then(|f| match f.value {
            Value::Varint(v) => Some(v),
            _ => None,
        })
    }

    /// A repeated varint field, packed or not (both are valid on the wire).
    pub fn varints(&self, number: u32) -> Result<Vec<u64>, WireError> {
        let mut out = Vec::new();
        for f in self.fields.iter().filter(|f| f.number == number) {
            match &f.value {
                Value::Varint(v) => out.push(*v),
                Value::Bytes(b) => {
                    let mut at = 0;
                    while at < b.len() {
                        out.push(read_varint(b, &mut at)?);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// A repeated 32-bit field (ONNX's `float_data`), packed or not.
    pub fn fixed32s(&self, number: u32) -> Result<Vec<u32>, WireError> {
        let mut out = Vec::new();
        for f in self.fields.iter().filter(|f| f.number == number) {
            match &f.value {
                Value::Fixed32(v) => out.push(*v),
                Value::Bytes(b) if b.len() % 4 == 0 => {
                    out.extend(b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))))
                }
                Value::Bytes(b) => return Err(WireError::Truncated(b.len())),
                _ => {}
            }
        }
        Ok(out)
    }

    pub fn messages(&self, number: u32) -> Result<Vec<Message>, WireError> {
        self.all_bytes(number).map(Message::parse).collect()
    }
}

fn take<'a>(buf: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8], WireError> {
    let end = at.checked_add(len).filter(|&e| e <= buf.len()).ok_or(WireError::Truncated(*at))?;
    let out = &buf[*at..end];
    *at = end;
    Ok(out)
}

fn read_varint(buf: &[u8], at: &mut usize) -> Result<u64, WireError> {
    let start = *at;
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *buf.get(*at).ok_or(WireError::Truncated(start))?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return Err(WireError::VarintTooLong(start));
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::VarintTooLong(start))
}

pub fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_byte_for_byte() {
        let msg = Message {
            fields: vec![
                Field::varint(1, 300),
                Field::bytes(2, b"conv".to_vec()),
                Field { number: 3, value: Value::Fixed32(0x3f80_0000) },
                Field { number: 4, value: Value::Fixed64(u64::MAX) },
                Field::varint(5, u64::MAX),
                Field::varint(1, 7),
            ],
        };
        let bytes = msg.encode();
        let back = Message::parse(&bytes).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.varint(1), Some(7), "the last occurrence wins");
        assert_eq!(back.string(2).unwrap(), Some("conv"));
    }

    #[test]
    fn packed_and_unpacked_repeated_fields_read_alike() {
        let mut packed = Vec::new();
        for v in [1u64, 150, 3] {
            write_varint(&mut packed, v);
        }
        let msg = Message { fields: vec![Field::bytes(8, packed), Field::varint(8, 4)] };
        assert_eq!(msg.varints(8).unwrap(), vec![1, 150, 3, 4]);
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        assert_eq!(Message::parse(&[0x0a, 5, b'a']), Err(WireError::Truncated(2)));
        assert_eq!(Message::parse(&[0x08, 0x80]), Err(WireError::Truncated(1)));
        assert!(matches!(Message::parse(&[0x0b]), Err(WireError::WireType { wire_type: 3, .. })));
        assert!(Message::parse(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
