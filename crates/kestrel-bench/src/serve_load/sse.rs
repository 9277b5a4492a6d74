//! Incremental Server-Sent Events parser.
//!
//! Bytes arrive in whatever pieces the transport delivers (HTTP chunks, TCP
//! reads), so a line, a `\r\n` pair or a UTF-8 character may be split
//! anywhere. The parser keeps the unfinished line and the current event's
//! data between calls; steady state it allocates nothing (both buffers are
//! reused), which matters because a fast server streams one event per token.
//!
//! Only `data:` fields matter to a load generator: `event:`, `id:`, `retry:`
//! and comment lines are accepted and ignored. Lines end with `\n`, `\r\n`
//! or a lone `\r`, as the SSE specification allows.

/// SSE parser state carried across input pieces.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The unfinished last line of the input so far.
    line: Vec<u8>,
    /// The data of the event being built (its `data:` lines joined by `\n`).
    data: Vec<u8>,
    has_data: bool,
    /// The previous piece ended in `\r`: a `\n` opening the next piece
    /// belongs to the same line ending.
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Feeds one piece of the stream; calls `on_event` with each complete
    /// event's data, in order.
    pub fn feed(&mut self, mut input: &[u8], mut on_event: impl FnMut(&[u8])) {
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = input.strip_prefix(b"\n") {
                input = rest;
            }
        }
        while let Some(end) = input.iter().position(|&b| b == b'\n' || b == b'\r') {
            let terminator = input[end];
            if self.line.is_empty() {
                self.on_line(&input[..end], &mut on_event);
            } else {
                // A line split across pieces: finish it in the carry buffer.
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&input[..end]);
                self.on_line(&line, &mut on_event);
                line.clear();
                self.line = line;
            }
            input = &input[end + 1..];
            if terminator == b'\r' {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.line.extend_from_slice(input);
    }

    fn on_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8])) {
        if line.is_empty() {
            if self.has_data {
                on_event(&self.data);
                self.data.clear();
                self.has_data = false;
            }
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // a comment (keep-alive pings)
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        if field == b"data" {
            if self.has_data {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
            self.has_data = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(pieces: &[&[u8]]) -> Vec<String> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for piece in pieces {
            p.feed(piece, |d| out.push(String::from_utf8_lossy(d).into_owned()));
        }
        out
    }

    #[test]
    fn parses_events_comments_and_multiline_data() {
        let got =
            events(&[b": ping\n\ndata: {\"a\":1}\n\nevent: x\ndata: one\ndata:two\n\ndata: [DONE]\n\n"]);
        assert_eq!(got, vec!["{\"a\":1}", "one\ntwo", "[DONE]"]);
    }

    #[test]
    fn crlf_split_between_pieces_is_one_line_ending() {
        let got = events(&[b"data: a\r", b"\n\r", b"\ndata: b\r\r"]);
        assert_eq!(got, vec!["a", "b"]);
    }

    #[test]
    fn an_unterminated_event_is_not_delivered() {
        assert!(events(&[b"data: partial\n"]).is_empty());
    }
}
