//! GPT-2's byte-level alphabet: every byte is written as one printable
//! character so that byte strings can live in a text vocabulary ("Ġ" is the
//! space byte 0x20, "Ċ" is the newline 0x0A). Bytes whose Latin-1 character
//! is already printable map to themselves; the other 68 are given the code
//! points U+0100 upwards, in byte order.

/// Whether byte `b` stands for itself in the alphabet.
fn is_self_mapped(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// Code point of each byte in the alphabet.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for b in 0..=255u8 {
        table[usize::from(b)] = if is_self_mapped(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

/// Reverse map from alphabet character to byte; the alphabet spans
/// U+0000..U+0143, so a flat array indexed by code point suffices.
pub(crate) struct ByteDecoder {
    table: [Option<u8>; 0x144],
}

impl ByteDecoder {
    pub(crate) fn new() -> ByteDecoder {
        let mut table = [None; 0x144];
        for (b, c) in byte_to_char_table().iter().enumerate() {
            if let Some(slot) = table.get_mut(*c as usize) {
                *slot = u8::try_from(b).ok();
            }
        }
        ByteDecoder { table }
    }

    /// Appends the bytes `text` stands for. Characters outside the alphabet
    /// (which a well-formed byte-level vocabulary never has) are kept as
    /// their own UTF-8 so nothing is silently lost.
    pub(crate) fn decode_into(&self, text: &str, out: &mut Vec<u8>) {
        for c in text.chars() {
            match self.table.get(c as usize).copied().flatten() {
                Some(b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_is_a_bijection_with_known_points() {
        let table = byte_to_char_table();
        assert_eq!(table[usize::from(b' ')], 'Ġ');
        assert_eq!(table[usize::from(b'\n')], 'Ċ');
        assert_eq!(table[usize::from(b'a')], 'a');
        assert_eq!(table[0xAD], 'Ń');
        let dec = ByteDecoder::new();
        for b in 0..=255u8 {
            let mut out = Vec::new();
            dec.decode_into(&table[usize::from(b)].to_string(), &mut out);
            assert_eq!(out, vec![b]);
        }
    }

    #[test]
    fn characters_outside_the_alphabet_are_kept() {
        let mut out = Vec::new();
        ByteDecoder::new().decode_into("ĠhiĠ€", &mut out);
        assert_eq!(out, " hi €".as_bytes());
    }
}
