//! Prompt-lookup (n-gram) speculative decoding for greedy requests.
//!
//! A decode step of one sequence costs the device about as much as a step
//! of a few (batch 1 and batch 8 differ by ~10% on an H100: the step is
//! bound by latency, not by arithmetic). So where the next tokens can be
//! guessed, one step can check several of them: the sequence's last token
//! and `d` drafted tokens go in as `d + 1` rows of one step, row `j` at
//! position `p + j` seeing the keys of the rows before it, and the argmax of
//! row `j` is the model's token after draft `j`. The leading drafts the
//! argmaxes confirm are kept, plus the argmax after the last kept one, so a
//! step yields between 1 and `d + 1` tokens, exactly those plain greedy
//! decoding yields (the check is the same argmax).
//!
//! Drafts come from the sequence itself: the most recent earlier place where
//! its last `n` tokens occurred, for `n` from `max_ngram` down to
//! `min_ngram`, proposes the tokens that followed there. Small models
//! repeat themselves and code and structured text repeat their context, so
//! the guesses are often right and cost nothing to make.

use crate::error::EngineError;

/// Settings of n-gram speculation (`EngineConfig::speculation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NgramSpeculation {
    /// Most drafted tokens per sequence and step.
    pub tokens: usize,
    /// Shortest suffix that may propose a draft.
    pub min_ngram: usize,
    /// Longest suffix tried first.
    pub max_ngram: usize,
    /// Steps with more running sequences than this decode plainly: a
    /// large batch already fills the device, and drafts would only add rows.
    pub max_seqs: usize,
}

impl Default for NgramSpeculation {
    fn default() -> Self {
        NgramSpeculation {
            tokens: 4,
            min_ngram: 1,
            max_ngram: 3,
            max_seqs: 8,
        }
    }
}

/// Most drafted tokens per step a setting may ask for.
pub const MAX_DRAFT_TOKENS: usize = 16;

/// How far back a draft is looked for: the search is linear in it, and it
/// runs on the host between steps.
const SEARCH_WINDOW: usize = 4096;

impl NgramSpeculation {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field, value: usize, expected| Err(EngineError::config(field, value, expected));
        if !(1..=MAX_DRAFT_TOKENS).contains(&self.tokens) {
            return bad("speculation.tokens", self.tokens, "an integer in [1, 16]");
        }
        if self.min_ngram == 0 || self.min_ngram > self.max_ngram {
            return bad(
                "speculation.min_ngram",
                self.min_ngram,
                "at least 1 and at most speculation.max_ngram",
            );
        }
        if self.max_ngram > 16 {
            return bad("speculation.max_ngram", self.max_ngram, "at most 16");
        }
        if self.max_seqs == 0 {
            return bad("speculation.max_seqs", self.max_seqs, "at least 1");
        }
        Ok(())
    }

    /// Up to `limit.min(self.tokens)` tokens guessed to follow `tokens`
    /// (empty when no suffix of at least `min_ngram` tokens occurred
    /// before). A match near the end continues into its own draft, so a
    /// sequence looping with a short period drafts whole periods.
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let want = limit.min(self.tokens);
        let len = tokens.len();
        if want == 0 {
            return Vec::new();
        }
        let from = len.saturating_sub(SEARCH_WINDOW);
        for n in (self.min_ngram..=self.max_ngram).rev() {
            if len <= n {
                continue;
            }
            let suffix = &tokens[len - n..];
            // Earlier occurrences only: a start at or after len - n is the
            // suffix itself.
            let Some(i) = tokens[from..len - 1]
                .windows(n)
                .rposition(|w| w == suffix)
                .map(|i| i + from)
            else {
                continue;
            };
            let mut draft = Vec::with_capacity(want);
            for j in 0..want {
                let at = i + n + j;
                let t = if at < len { tokens[at] } else { draft[at - len] };
                draft.push(t);
            }
            return draft;
        }
        Vec::new()
    }
}

/// How many leading drafts the model confirmed: `picked[j]` is the model's
/// token after the input of row `j` (the last token, then the drafts), so
/// draft `j` stands while it equals `picked[j]` and every draft before it
/// stood.
pub fn confirmed(draft: &[u32], picked: &[u32]) -> usize {
    draft.iter().zip(picked).take_while(|(d, p)| d == p).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tokens: usize, min_ngram: usize, max_ngram: usize) -> NgramSpeculation {
        NgramSpeculation {
            tokens,
            min_ngram,
            max_ngram,
            max_seqs: 8,
        }
    }

    #[test]
    fn the_longest_recent_match_proposes_what_followed_it() {
        // "a b c d | x b c e | ... b c": the 2-gram "b c" last occurred
        // before "e", the 3-gram "x b c" matches nothing, so "e ..." wins
        // over the older "d".
        let t = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3];
        assert_eq!(spec(2, 1, 3).propose(&t, 8), vec![5, 6]);
        // The longer suffix "7 2 3" is not found; "2 3" is.
        assert_eq!(spec(3, 2, 3).propose(&t, 8), vec![5, 6, 7]);
        // An older, longer match beats a newer, shorter one.
        let t = [1, 2, 3, 8, 5, 3, 9, 1, 2, 3];
        assert_eq!(spec(2, 1, 3).propose(&t, 8), vec![8, 5]);
    }

    #[test]
    fn drafts_respect_both_limits_and_loops_continue_into_themselves() {
        let t = [7, 8, 7, 8, 7, 8];
        // Period 2: the most recent "7 8" is at 2; what follows runs into the
        // draft itself, so the loop continues for the whole draft.
        assert_eq!(spec(5, 1, 2).propose(&t, 16), vec![7, 8, 7, 8, 7]);
        assert_eq!(spec(5, 1, 2).propose(&t, 3), vec![7, 8, 7]);
        assert!(spec(5, 1, 2).propose(&t, 0).is_empty());
    }

    #[test]
    fn no_match_no_draft() {
        assert!(spec(4, 1, 3).propose(&[1, 2, 3, 4], 4).is_empty());
        assert!(spec(4, 2, 3).propose(&[5, 1, 2, 5], 4).is_empty());
        assert!(spec(4, 1, 3).propose(&[], 4).is_empty());
        assert!(spec(4, 1, 3).propose(&[5], 4).is_empty());
        // Only the suffix itself matches: nothing earlier.
        assert!(spec(4, 2, 2).propose(&[1, 2], 4).is_empty());
        // A one-token repeat with min_ngram 1.
        assert_eq!(spec(4, 1, 3).propose(&[5, 6, 5], 2), vec![6, 5]);
    }

    #[test]
    fn confirmed_counts_the_leading_agreement() {
        assert_eq!(confirmed(&[4, 5, 6], &[4, 5, 6, 7]), 3);
        assert_eq!(confirmed(&[4, 5, 6], &[4, 9, 6, 7]), 1);
        assert_eq!(confirmed(&[4, 5, 6], &[1, 5, 6, 7]), 0);
        assert_eq!(confirmed(&[], &[1]), 0);
    }

    #[test]
    fn settings_out_of_range_are_named() {
        assert!(NgramSpeculation::default().validate().is_ok());
        for (s, field) in [
            (spec(0, 1, 3), "speculation.tokens"),
            (spec(17, 1, 3), "speculation.tokens"),
            (spec(4, 0, 3), "speculation.min_ngram"),
            (spec(4, 4, 3), "speculation.min_ngram"),
            (spec(4, 1, 17), "speculation.max_ngram"),
        ] {
            match s.validate() {
                Err(EngineError::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{s:?}: expected a config error on {field}, got {other:?}"),
            }
        }
    }
}
