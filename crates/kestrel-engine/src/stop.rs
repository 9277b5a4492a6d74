//! Stop strings matched across token boundaries.
//!
//! Generated text arrives a token's worth at a time, so a stop string can be
//! split over several pieces. [`StopMatcher`] releases text as soon as it can
//! no longer be part of a stop string and holds back only a suffix that might
//! still begin one; when a stop is found, everything from its start on is
//! dropped.
//!
//! # Which stop wins
//!
//! The stop whose occurrence *starts* earliest in the text wins (the shorter
//! one when two start at the same place). The result therefore depends only
//! on the full text, never on how it was split into pieces: if `"bc"` has
//! completed but a longer `"abcd"` could still complete one byte earlier, the
//! matcher waits for the next piece before deciding.
//!
//! # Cost
//!
//! Each stop string runs a streaming Knuth-Morris-Pratt automaton over the
//! bytes, so a push costs O(new bytes x number of stops) plus the held text,
//! which is always shorter than the longest stop string. Stops are valid UTF-8
//! and begin with a character's first byte, so every cut falls on a character
//! boundary.

/// Result of feeding text to a [`StopMatcher`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that is now safe to send to the client.
    pub emit: String,
    /// Index (into the stop list given to [`StopMatcher::new`]) of the stop
    /// string that ended generation, reported once.
    pub stopped: Option<usize>,
}

/// Streaming search for one stop string.
struct StopPattern {
    /// Position in the caller's stop list.
    index: usize,
    bytes: Vec<u8>,
    /// `border[i]`: length of the longest proper prefix of `bytes[..=i]` that
    /// is also its suffix (the KMP failure function).
    border: Vec<usize>,
    /// Length of the longest suffix of the text so far that is a proper
    /// prefix of `bytes`: a partial match that may still complete.
    state: usize,
}

impl StopPattern {
    fn new(index: usize, stop: &str) -> StopPattern {
        let bytes = stop.as_bytes().to_vec();
        let mut border = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = border[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            border[i] = k;
        }
        StopPattern {
            index,
            bytes,
            border,
            state: 0,
        }
    }

    /// Advances over one byte; true when the whole stop string just matched.
    fn advance(&mut self, byte: u8) -> bool {
        while self.state > 0 && self.bytes[self.state] != byte {
            self.state = self.border[self.state - 1];
        }
        if self.bytes[self.state] == byte {
            self.state += 1;
        }
        if self.state == self.bytes.len() {
            // Keep the longest border so overlapping occurrences are found.
            self.state = self.border[self.state - 1];
            true
        } else {
            false
        }
    }
}

/// A complete occurrence not yet confirmed as the earliest.
#[derive(Clone, Copy)]
struct Found {
    /// Absolute byte offset of the occurrence in the whole text.
    start: usize,
    index: usize,
}

/// Finds stop strings in streamed text without emitting anything past them.
pub struct StopMatcher {
    patterns: Vec<StopPattern>,
    /// Text received but not yet emitted.
    held: String,
    /// Absolute byte offset of `held`'s first byte.
    held_start: usize,
    /// Total bytes received.
    consumed: usize,
    found: Option<Found>,
    stopped: Option<usize>,
    /// Set once stopped or flushed: later input is ignored.
    finished: bool,
}

impl StopMatcher {
    /// Builds a matcher for `stops`. Empty strings are ignored (validation
    /// rejects them); duplicates are harmless.
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            patterns: stops
                .iter()
                .enumerate()
                .filter(|(_, stop)| !stop.is_empty())
                .map(|(index, stop)| StopPattern::new(index, stop))
                .collect(),
            held: String::new(),
            held_start: 0,
            consumed: 0,
            found: None,
            stopped: None,
            finished: false,
        }
    }

    /// Whether any stop string is watched for (otherwise text never ends
    /// generation).
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// The stop string that ended generation, if any.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Feeds newly decoded text. Returns the text that can no longer belong to
    /// a stop string, and the stop's index once one is confirmed (the text
    /// before it is emitted, the rest dropped). After that, or after
    /// [`flush`](Self::flush), pushes emit nothing.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.finished {
            return StopOutput::default();
        }
        self.held.push_str(text);
        for (offset, &byte) in text.as_bytes().iter().enumerate() {
            let end = self.consumed + offset + 1;
            for pattern in &mut self.patterns {
                if pattern.advance(byte) {
                    let candidate = Found {
                        start: end - pattern.bytes.len(),
                        index: pattern.index,
                    };
                    // At an equal start the shorter stop completes first,
                    // so keeping the first found also settles that tie.
                    if self.found.is_none_or(|f| candidate.start < f.start) {
                        self.found = Some(candidate);
                    }
                }
            }
        }
        self.consumed += text.len();

        // Earliest start of a partial match that could still complete.
        let pending = self
            .patterns
            .iter()
            .filter(|p| p.state > 0)
            .map(|p| self.consumed - p.state)
            .min();
        match self.found {
            Some(found) if pending.is_none_or(|p| p >= found.start) => self.stop_at(found),
            _ => {
                let keep_from = pending.unwrap_or(self.consumed);
                let emit = self.take_until(keep_from);
                StopOutput { emit, stopped: None }
            }
        }
    }

    /// Ends the stream and returns the held text. If a stop had completed
    /// while a longer, earlier-starting one was still pending, only the text
    /// before it is returned and [`stopped`](Self::stopped) reports it.
    pub fn flush(&mut self) -> String {
        if self.finished {
            return String::new();
        }
        match self.found {
            Some(found) => self.stop_at(found).emit,
            None => {
                self.finished = true;
                std::mem::take(&mut self.held)
            }
        }
    }

    fn stop_at(&mut self, found: Found) -> StopOutput {
        let emit = self.take_until(found.start);
        self.held.clear();
        self.finished = true;
        self.stopped = Some(found.index);
        StopOutput {
            emit,
            stopped: self.stopped,
        }
    }

    /// Removes and returns the held text before absolute offset `until`.
    fn take_until(&mut self, until: usize) -> String {
        let mut cut = until.saturating_sub(self.held_start).min(self.held.len());
        // Cuts land on a stop's first byte, always a character boundary;
        // this guard only keeps a logic slip from becoming a panic.
        while !self.held.is_char_boundary(cut) {
            cut -= 1;
        }
        let rest = self.held.split_off(cut);
        self.held_start += cut;
        std::mem::replace(&mut self.held, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopMatcher::new(&stops)
    }

    fn out(emit: &str, stopped: Option<usize>) -> StopOutput {
        StopOutput {
            emit: emit.to_string(),
            stopped,
        }
    }

    #[test]
    fn text_without_stops_passes_straight_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("hello "), out("hello ", None));
        assert_eq!(m.push("world"), out("world", None));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_split_over_two_pieces() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("hello </"), out("hello ", None));
        assert_eq!(m.push("s> world"), out("", Some(0)));
        assert_eq!(m.push("more"), out("", None));
        assert_eq!(m.flush(), "");
        assert_eq!(m.stopped(), Some(0));
    }

    #[test]
    fn stop_split_over_three_pieces() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("xS"), out("x", None));
        assert_eq!(m.push("T"), out("", None));
        assert_eq!(m.push("OPy"), out("", Some(0)));
    }

    #[test]
    fn failed_partial_match_is_released() {
        let mut m = matcher(&["abc"]);
        assert_eq!(m.push("xab"), out("x", None));
        assert_eq!(m.push("d"), out("abd", None));
        // A new partial inside the released text is still held.
        assert_eq!(m.push("aab"), out("a", None));
        assert_eq!(m.push("c"), out("", Some(0)));
    }

    #[test]
    fn self_overlapping_stop_is_found() {
        let mut m = matcher(&["aab"]);
        assert_eq!(m.push("xaa"), out("x", None));
        assert_eq!(m.push("ab"), out("a", Some(0)));
    }

    #[test]
    fn earliest_start_wins_even_if_it_completes_later() {
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(m.push("zabc"), out("z", None));
        assert_eq!(m.push("d"), out("", Some(0)));

        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(m.push("zabc"), out("z", None));
        assert_eq!(m.push("x"), out("a", Some(1)));

        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(m.push("zabcd"), out("z", Some(0)));
    }

    #[test]
    fn shorter_of_two_stops_at_the_same_start_wins() {
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xabc"), out("x", Some(1)));
        let mut m = matcher(&["ab", "abc"]);
        assert_eq!(m.push("xa"), out("x", None));
        assert_eq!(m.push("b"), out("", Some(0)));
    }

    #[test]
    fn partial_match_at_end_is_released_by_flush() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("the EN"), out("the ", None));
        assert_eq!(m.flush(), "EN");
        assert_eq!(m.stopped(), None);
        assert_eq!(m.push("D"), out("", None));
    }

    #[test]
    fn flush_reports_a_stop_held_behind_a_pending_longer_one() {
        let mut m = matcher(&["abcd", "bc"]);
        assert_eq!(m.push("zabc"), out("z", None));
        assert_eq!(m.flush(), "a");
        assert_eq!(m.stopped(), Some(1));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        let mut m = matcher(&["€b", "😀!"]);
        assert_eq!(m.push("a₂€"), out("a₂", None));
        assert_eq!(m.push("c😀"), out("€c", None));
        assert_eq!(m.push("😀!"), out("😀", Some(1)));
        let mut m = matcher(&["é"]);
        assert_eq!(m.push("cafe\u{301} caf"), out("cafe\u{301} caf", None));
        assert_eq!(m.push("é"), out("", Some(0)));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let mut m = matcher(&["", "x"]);
        assert_eq!(m.push("abx"), out("ab", Some(1)));
    }

    fn alphabet() -> impl Strategy<Value = char> {
        prop::sample::select(vec!['a', 'b', 'c', ' ', 'é', '€', '😀'])
    }

    proptest! {
        #[test]
        fn emitted_text_is_the_text_before_the_earliest_stop(
            chars in prop::collection::vec(alphabet(), 0..60),
            cuts in prop::collection::vec(0usize..61, 0..12),
            picks in prop::collection::vec((0usize..60, 1usize..6), 0..3),
            random_stops in prop::collection::vec(prop::collection::vec(alphabet(), 1..5), 0..3),
        ) {
            let text: String = chars.iter().collect();
            // Stops taken from inside the text, plus arbitrary ones.
            let mut stops: Vec<String> = picks
                .iter()
                .filter(|_| !chars.is_empty())
                .map(|&(start, len)| {
                    let start = start % chars.len();
                    let end = (start + len).min(chars.len());
                    chars[start..end].iter().collect()
                })
                .collect();
            stops.extend(random_stops.iter().map(|s| s.iter().collect::<String>()));
            let longest = stops.iter().map(String::len).max().unwrap_or(0);

            // Split at char indices.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(chars.len())).collect();
            cuts.push(chars.len());
            cuts.sort_unstable();
            let byte_at = |ci: usize| text.char_indices().nth(ci).map_or(text.len(), |(b, _)| b);

            let mut m = StopMatcher::new(&stops);
            let mut emitted = String::new();
            let mut stopped = None;
            let mut from = 0;
            for &cut in &cuts {
                let to = byte_at(cut);
                let piece = &text[from..to];
                from = to;
                let o = m.push(piece);
                emitted.push_str(&o.emit);
                if o.stopped.is_some() {
                    stopped = o.stopped;
                    break;
                }
                // Only a possible stop prefix is ever held back.
                prop_assert!(emitted.len() + longest.saturating_sub(1) >= to);
            }
            emitted.push_str(&m.flush());
            prop_assert!(stopped.is_none() || m.stopped() == stopped);
            stopped = m.stopped();

            let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
            match first {
                Some(at) => {
                    prop_assert_eq!(&emitted, &text[..at]);
                    let idx = stopped.expect("a stop occurs in the text");
                    prop_assert!(text[at..].starts_with(stops[idx].as_str()));
                    prop_assert!(stops.iter().all(|s| !text[at..].starts_with(s.as_str()) || s.len() >= stops[idx].len()));
                }
                None => {
                    prop_assert_eq!(&emitted, &text);
                    prop_assert_eq!(stopped, None);
                }
            }
        }
    }
}
