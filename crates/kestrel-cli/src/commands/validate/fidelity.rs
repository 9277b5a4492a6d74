//! Token-ID fidelity: how far two greedy continuations agree.

use serde::Serialize;

/// A token at the point of divergence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenAt {
    pub id: u32,
    pub text: String,
}

/// Where two continuations first differ. A side is None when its
/// continuation ended there (it is a prefix of the other).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Divergence {
    pub index: usize,
    pub baseline: Option<TokenAt>,
    pub candidate: Option<TokenAt>,
}

/// One prompt's comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptFidelity {
    pub prompt: String,
    /// Tokens equal before the first divergence.
    pub matched: usize,
    /// The longer continuation's length.
    pub total: usize,
    pub identical: bool,
    pub divergence: Option<Divergence>,
    /// The prompt itself tokenized differently on the two sides (different
    /// tokenizers), which makes the comparison one of different inputs.
    pub prompt_ids_differ: bool,
    /// Timed runs that disagreed with the side's own first run.
    pub baseline_unstable_runs: usize,
    pub candidate_unstable_runs: usize,
}

impl PromptFidelity {
    /// Passes when both continuations are identical and each side gave the
    /// same ids on every run.
    pub fn pass(&self) -> bool {
        self.identical && self.baseline_unstable_runs == 0 && self.candidate_unstable_runs == 0
    }
}

/// One side of a comparison: generated ids and their texts.
pub struct Side<'a> {
    pub prompt_ids: &'a [u32],
    pub tokens: &'a [u32],
    pub texts: &'a [String],
    pub unstable_runs: usize,
}

fn token_at(side: &Side<'_>, i: usize) -> Option<TokenAt> {
    side.tokens.get(i).map(|&id| TokenAt {
        id,
        text: side.texts.get(i).cloned().unwrap_or_default(),
    })
}

/// Compares the candidate's continuation with the baseline's.
pub fn compare(prompt: &str, baseline: &Side<'_>, candidate: &Side<'_>) -> PromptFidelity {
    let (b, c) = (baseline.tokens, candidate.tokens);
    let matched = b.iter().zip(c).take_while(|(x, y)| x == y).count();
    let identical = b == c;
    let divergence = (!identical).then(|| Divergence {
        index: matched,
        baseline: token_at(baseline, matched),
        candidate: token_at(candidate, matched),
    });
    PromptFidelity {
        prompt: prompt.to_string(),
        matched,
        total: b.len().max(c.len()),
        identical,
        divergence,
        prompt_ids_differ: baseline.prompt_ids != candidate.prompt_ids,
        baseline_unstable_runs: baseline.unstable_runs,
        candidate_unstable_runs: candidate.unstable_runs,
    }
}

/// The whole comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub prompts: usize,
    /// Prompts whose continuations are identical.
    pub identical_prompts: usize,
    pub matched_tokens: usize,
    pub total_tokens: usize,
}

pub fn verdict(rows: &[PromptFidelity]) -> Verdict {
    Verdict {
        pass: !rows.is_empty() && rows.iter().all(PromptFidelity::pass),
        prompts: rows.len(),
        identical_prompts: rows.iter().filter(|r| r.identical).count(),
        matched_tokens: rows.iter().map(|r| r.matched).sum(),
        total_tokens: rows.iter().map(|r| r.total).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side<'a>(tokens: &'a [u32], texts: &'a [String]) -> Side<'a> {
        Side {
            prompt_ids: &[1, 2],
            tokens,
            texts,
            unstable_runs: 0,
        }
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i}")).collect()
    }

    #[test]
    fn divergence_is_the_first_differing_index() {
        let (tb, tc) = (texts(4), texts(4));
        let f = compare("p", &side(&[5, 6, 7, 8], &tb), &side(&[5, 6, 9, 8], &tc));
        assert_eq!((f.matched, f.total, f.identical), (2, 4, false));
        let d = f.divergence.clone().unwrap();
        assert_eq!(d.index, 2);
        assert_eq!(d.baseline.unwrap().id, 7);
        assert_eq!(
            d.candidate.unwrap(),
            TokenAt {
                id: 9,
                text: "t2".into()
            }
        );
        assert!(!f.pass());
        assert!(!verdict(&[f]).pass);
    }

    #[test]
    fn a_shorter_side_diverges_where_it_ends() {
        let (tb, tc) = (texts(3), texts(2));
        let f = compare("p", &side(&[5, 6, 7], &tb), &side(&[5, 6], &tc));
        assert_eq!((f.matched, f.total), (2, 3));
        let d = f.divergence.unwrap();
        assert_eq!((d.index, d.candidate), (2, None));
    }

    #[test]
    fn identical_runs_pass_unless_a_side_was_unstable() {
        let t = texts(2);
        let ok = compare("p", &side(&[1, 2], &t), &side(&[1, 2], &t));
        assert!(ok.pass() && ok.divergence.is_none());
        let mut shaky = side(&[1, 2], &t);
        shaky.unstable_runs = 1;
        let bad = compare("p", &side(&[1, 2], &t), &shaky);
        assert!(bad.identical && !bad.pass());
        let v = verdict(&[ok, bad]);
        assert_eq!(
            (v.pass, v.identical_prompts, v.matched_tokens, v.total_tokens),
            (false, 2, 4, 4)
        );
        assert!(!verdict(&[]).pass, "nothing compared is no pass");
    }
}
