//! Cutting special-token text (`<start_of_turn>`, Gemma's whitespace runs,
//! ...) out of input before normal tokenization, with llama.cpp's rule:
//! tokens are tried longest first, and each takes its occurrences left to
//! right among the text not yet claimed by a longer token.
//!
//! llama.cpp does this by scanning the whole text once per special token
//! (6k+ scans for Gemma). Here a byte trie finds, per position, the longest
//! token starting there, and a priority queue replays the longest-first
//! order: a candidate that runs into text claimed meanwhile is retried with
//! its next shorter match that still fits. The work is proportional to the
//! text length times the longest special token, never to the number of
//! special tokens.

use std::collections::{BTreeMap, BinaryHeap};

/// One piece of the partitioned input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    /// Ordinary text, tokenized by the model's algorithm.
    Text(&'t str),
    /// A special token found verbatim in the text.
    Token(u32),
}

#[derive(Clone, Debug, Default)]
struct Node {
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
    token: Option<u32>,
}

/// A byte trie over the texts of the special tokens.
#[derive(Clone, Debug)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
    /// Bytes that start at least one special token: other positions are
    /// skipped without touching the trie.
    starts: [bool; 256],
}

impl SpecialMatcher {
    /// Builds the trie. With duplicate texts the first id given wins.
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = (u32, &'a str)>) -> SpecialMatcher {
        let mut nodes = vec![Node::default()];
        let mut starts = [false; 256];
        for (id, text) in tokens {
            let bytes = text.as_bytes();
            let Some(&first) = bytes.first() else {
                continue;
            };
            starts[usize::from(first)] = true;
            let mut node = 0usize;
            for &b in bytes {
                node = match nodes[node].children.iter().find(|(c, _)| *c == b) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = nodes.len();
                        nodes.push(Node::default());
                        nodes[node].children.push((b, child as u32));
                        child
                    }
                };
            }
            nodes[node].token.get_or_insert(id);
        }
        for node in &mut nodes {
            node.children.sort_unstable_by_key(|&(b, _)| b);
        }
        SpecialMatcher { nodes, starts }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// The longest special token starting at `pos` whose length is at most
    /// `max_len`, as (length, id).
    fn longest_at(&self, text: &[u8], pos: usize, max_len: usize) -> Option<(usize, u32)> {
        let mut node = 0usize;
        let mut best = None;
        let end = text.len().min(pos.saturating_add(max_len));
        for (offset, &b) in text.get(pos..end)?.iter().enumerate() {
            let children = &self.nodes[node].children;
            match children.binary_search_by_key(&b, |&(c, _)| c) {
                Ok(i) => node = children[i].1 as usize,
                Err(_) => break,
            }
            if let Some(id) = self.nodes[node].token {
                best = Some((offset + 1, id));
            }
        }
        best
    }

    /// Splits `text` into ordinary text and special tokens.
    pub(crate) fn split<'t>(&self, text: &'t str) -> Vec<Fragment<'t>> {
        let bytes = text.as_bytes();
        let mut queue = BinaryHeap::new();
        if !self.is_empty() {
            for (pos, &b) in bytes.iter().enumerate() {
                if self.starts[usize::from(b)] {
                    if let Some((len, id)) = self.longest_at(bytes, pos, usize::MAX) {
                        queue.push(Candidate { len, id, pos });
                    }
                }
            }
        }
        if queue.is_empty() {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(text)]
            };
        }

        // Accepted matches: start -> (end, id). Disjoint by construction.
        let mut accepted: BTreeMap<usize, (usize, u32)> = BTreeMap::new();
        while let Some(c) = queue.pop() {
            let end = c.pos + c.len;
            let covered = accepted
                .range(..=c.pos)
                .next_back()
                .is_some_and(|(_, &(e, _))| e > c.pos);
            if covered {
                // Every match starting here lies inside a claimed span.
                continue;
            }
            match accepted.range(c.pos + 1..).next() {
                Some((&next_start, _)) if next_start < end => {
                    // Runs into a span claimed after this candidate was
                    // queued: retry with the longest match that still fits.
                    if let Some((len, id)) = self.longest_at(bytes, c.pos, next_start - c.pos) {
                        queue.push(Candidate { len, id, pos: c.pos });
                    }
                }
                _ => {
                    accepted.insert(c.pos, (end, c.id));
                }
            }
        }

        let mut out = Vec::with_capacity(accepted.len() * 2 + 1);
        let mut cursor = 0usize;
        for (start, (end, id)) in accepted {
            if start > cursor {
                if let Some(t) = text.get(cursor..start) {
                    out.push(Fragment::Text(t));
                }
            }
            out.push(Fragment::Token(id));
            cursor = end;
        }
        if cursor < text.len() {
            if let Some(t) = text.get(cursor..) {
                out.push(Fragment::Text(t));
            }
        }
        out
    }
}

/// A pending match. The heap pops longer matches first, then (as llama.cpp
/// processes one token at a time) lower ids, then leftmost positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Candidate {
    len: usize,
    id: u32,
    pos: usize,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.len
            .cmp(&other.len)
            .then_with(|| other.id.cmp(&self.id))
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Fragment::{Text, Token};

    /// llama.cpp's algorithm, literally: one pass per token, longest first.
    fn reference<'t>(tokens: &[(u32, &str)], text: &'t str) -> Vec<Fragment<'t>> {
        let mut order: Vec<(u32, &str)> = tokens.to_vec();
        order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        // Fragments as (start, end, Option<id>).
        let mut frags: Vec<(usize, usize, Option<u32>)> = vec![(0, text.len(), None)];
        for (id, tok) in order {
            let mut next = Vec::new();
            for (s, e, t) in frags {
                if t.is_some() {
                    next.push((s, e, t));
                    continue;
                }
                let mut base = s;
                while let Some(found) = text[base..e].find(tok) {
                    let m = base + found;
                    if m > base {
                        next.push((base, m, None));
                    }
                    next.push((m, m + tok.len(), Some(id)));
                    base = m + tok.len();
                }
                if base < e {
                    next.push((base, e, None));
                }
            }
            frags = next;
        }
        frags
            .into_iter()
            .map(|(s, e, t)| match t {
                Some(id) => Token(id),
                None => Text(&text[s..e]),
            })
            .collect()
    }

    #[test]
    fn splits_around_specials() {
        let m = SpecialMatcher::new([(1, "<s>"), (2, "\n"), (3, "\n\n")]);
        assert_eq!(
            m.split("a<s>b\n\n\nc"),
            vec![Text("a"), Token(1), Text("b"), Token(3), Token(2), Text("c")]
        );
        assert_eq!(m.split(""), Vec::<Fragment>::new());
        assert_eq!(m.split("plain"), vec![Text("plain")]);
        assert_eq!(m.split("<s>"), vec![Token(1)]);
    }

    #[test]
    fn longest_token_wins_even_when_it_starts_later() {
        // Leftmost-longest would take "ab" then "c"; llama.cpp takes "bcd".
        let toks = [(1, "ab"), (2, "bcd")];
        let m = SpecialMatcher::new(toks);
        assert_eq!(m.split("abcd"), vec![Text("a"), Token(2)]);
        assert_eq!(m.split("abcd"), reference(&toks, "abcd"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn matches_llama_cpp_partition(text in "[ab<>\n ]{0,40}") {
            let toks = [(1, "ab"), (2, "ba"), (3, "aba"), (4, "<a>"), (5, "\n\n"), (6, "\n"),
                        (7, "  "), (8, "   "), (9, "b<"), (10, ">a")];
            let m = SpecialMatcher::new(toks);
            prop_assert_eq!(m.split(&text), reference(&toks, &text));
        }
    }
}
