//! The SSE parser gives the same events however the stream is cut into
//! pieces (transport chunks can split a line, a CRLF pair or a UTF-8
//! character anywhere).

use kestrel_bench::serve_load::SseParser;
use proptest::prelude::*;

fn parse_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut p = SseParser::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
        let c = c.clamp(at, stream.len());
        p.feed(&stream[at..c], |d| out.push(d.to_vec()));
        at = c;
    }
    out
}

/// Serialises events (each a list of data lines) with one line ending and
/// comment lines between them, as servers send keep-alive pings.
fn serialise(events: &[(Vec<String>, bool)], eol: &str) -> Vec<u8> {
    let mut s = String::new();
    for (lines, ping) in events {
        if *ping {
            s.push_str(": ping");
            s.push_str(eol);
            s.push_str(eol);
        }
        for l in lines {
            s.push_str("data: ");
            s.push_str(l);
            s.push_str(eol);
        }
        s.push_str(eol);
    }
    s.into_bytes()
}

proptest! {
    #[test]
    fn any_split_gives_the_same_events(
        events in prop::collection::vec(
            (prop::collection::vec("[a-z0-9 :{}\\[\\]\"é€😀]{0,16}", 1..4), any::<bool>()),
            0..12,
        ),
        eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        mut cuts in prop::collection::vec(0usize..2000, 0..40),
    ) {
        let stream = serialise(&events, eol);
        cuts.sort_unstable();
        let expected: Vec<Vec<u8>> = events.iter().map(|(l, _)| l.join("\n").into_bytes()).collect();
        prop_assert_eq!(&parse_pieces(&stream, &[]), &expected);
        prop_assert_eq!(&parse_pieces(&stream, &cuts), &expected);
        // One byte at a time: every possible boundary at once.
        let every: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(&parse_pieces(&stream, &every), &expected);
    }
}
