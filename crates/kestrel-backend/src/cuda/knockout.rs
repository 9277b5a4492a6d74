//! Knockout profiling (diagnostic knob `KESTREL_KNOCKOUT`): launches named
//! there are skipped, so a timing run without them tells how much of the
//! step's critical path they hold *inside* the CUDA graph, with PDL overlap,
//! which per-kernel profilers cannot show (ncu serialises kernels; there,
//! one token's kernels sum to ~2.3x the step). Results are garbage while it
//! is on: it is for `kestrel bench` timings only, never for outputs.
//!
//! Syntax: a comma-separated list of `name` (every launch of that kernel) or
//! `name@i/n` (the launches whose running count of `name` in this process
//! is i modulo n: `hgemm_1@1/4` is the second of the four GEMMs of each
//! layer at one sequence, the Wo projection). `list` skips nothing and
//! prints each kernel name the first time it is launched.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

struct Rule {
    name: String,
    /// (i, n) of `name@i/n`; None: every launch.
    every: Option<(u64, u64)>,
}

struct Knockout {
    rules: Vec<Rule>,
    list: bool,
    /// Launches of each ruled name so far, and how many were skipped.
    counts: Mutex<HashMap<String, (u64, u64)>>,
}

fn parse(spec: &str) -> Vec<Rule> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('@') {
            Some((name, sel)) => {
                let every = sel
                    .split_once('/')
                    .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)))
                    .filter(|&(i, n): &(u64, u64)| n > 0 && i < n);
                if every.is_none() {
                    eprintln!("KESTREL_KNOCKOUT: '{s}': expected name@i/n with i < n; ignored");
                }
                Rule {
                    name: name.to_string(),
                    every: every.or(Some((u64::MAX, 1))),
                }
            }
            None => Rule {
                name: s.to_string(),
                every: None,
            },
        })
        .collect()
}

fn knockout() -> Option<&'static Knockout> {
    static K: OnceLock<Option<Knockout>> = OnceLock::new();
    K.get_or_init(|| {
        let spec = std::env::var("KESTREL_KNOCKOUT").ok()?;
        let list = spec.trim() == "list";
        let rules = if list { Vec::new() } else { parse(&spec) };
        if rules.is_empty() && !list {
            return None;
        }
        if !list {
            eprintln!("KESTREL_KNOCKOUT={spec}: these launches are skipped; outputs are meaningless");
        }
        Some(Knockout {
            rules,
            list,
            counts: Mutex::new(HashMap::new()),
        })
    })
    .as_ref()
}

/// Whether the launch of `name` about to be made is knocked out.
pub(crate) fn skips(name: &str) -> bool {
    let Some(k) = knockout() else {
        return false;
    };
    if k.list {
        if let Ok(mut counts) = k.counts.lock() {
            let c = counts.entry(name.to_string()).or_default();
            if c.0 == 0 {
                eprintln!("KESTREL_KNOCKOUT=list: launch of '{name}'");
            }
            c.0 += 1;
        }
        return false;
    }
    let mut hit = false;
    let mut ruled = false;
    for r in k.rules.iter().filter(|r| r.name == name) {
        ruled = true;
        let Ok(counts) = k.counts.lock() else {
            return false;
        };
        let seen = counts.get(name).map_or(0, |c| c.0);
        hit |= match r.every {
            None => true,
            Some((i, n)) => seen % n == i,
        };
    }
    if ruled {
        if let Ok(mut counts) = k.counts.lock() {
            let c = counts.entry(name.to_string()).or_default();
            c.0 += 1;
            c.1 += hit as u64;
            if c.1 == 1 && hit {
                eprintln!("KESTREL_KNOCKOUT: skipping '{name}' launches");
            }
        }
    }
    hit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_names_and_residues() {
        let r = parse("attention_pre, hgemm_1@1/4,bad@x");
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].name.as_str(), r[0].every), ("attention_pre", None));
        assert_eq!((r[1].name.as_str(), r[1].every), ("hgemm_1", Some((1, 4))));
        // A malformed selector matches no launch (u64::MAX is never a residue).
        assert_eq!(r[2].every, Some((u64::MAX, 1)));
    }
}
