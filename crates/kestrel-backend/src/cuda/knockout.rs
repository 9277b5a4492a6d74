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

/// Which launches of a kernel a rule skips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Select {
    All,
    /// `name@i/n`: the launches whose running count is i modulo n.
    Residue(u64, u64),
}

struct Rule {
    name: String,
    select: Select,
}

struct Knockout {
    rules: Vec<Rule>,
    list: bool,
    /// Launches of each kernel seen so far (ruled ones, or all with `list`).
    counts: Mutex<HashMap<String, u64>>,
}

/// The rules of a spec; malformed ones are dropped with a warning.
fn parse(spec: &str) -> Vec<Rule> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let Some((name, sel)) = s.split_once('@') else {
                return Some(Rule {
                    name: s.to_string(),
                    select: Select::All,
                });
            };
            let residue = sel
                .split_once('/')
                .and_then(|(i, n)| Some((i.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
                .filter(|&(i, n)| n > 0 && i < n);
            if residue.is_none() {
                eprintln!("KESTREL_KNOCKOUT: '{s}': expected name@i/n with i < n; ignored");
            }
            residue.map(|(i, n)| Rule {
                name: name.to_string(),
                select: Select::Residue(i, n),
            })
        })
        .collect()
}

/// Whether the `seen`-th launch (from 0) of `name` is skipped; None when no
/// rule names it.
fn decide(rules: &[Rule], name: &str, seen: u64) -> Option<bool> {
    let mut ruled = rules.iter().filter(|r| r.name == name).peekable();
    ruled.peek()?;
    Some(ruled.any(|r| match r.select {
        Select::All => true,
        Select::Residue(i, n) => seen % n == i,
    }))
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
    let Ok(mut counts) = k.counts.lock() else {
        return false;
    };
    if k.list {
        let seen = counts.entry(name.to_string()).or_default();
        if *seen == 0 {
            eprintln!("KESTREL_KNOCKOUT=list: launch of '{name}'");
        }
        *seen += 1;
        return false;
    }
    let seen = counts.get(name).copied().unwrap_or(0);
    let Some(hit) = decide(&k.rules, name, seen) else {
        return false;
    };
    // The first few skips say so, so a run shows its rules took effect.
    if hit && seen < 4 {
        eprintln!("KESTREL_KNOCKOUT: skipping launch {seen} of '{name}'");
    }
    counts.insert(name.to_string(), seen + 1);
    hit
}

/// Diagnostic knob `KESTREL_SHARED_WEIGHTS`: a comma-separated list of GEMM
/// shapes `MxK` (weight rows x columns, e.g. `4096x640` for the stacked
/// gate/up of the default model) or `all`. Every one-to-eight-row `hgemm_*`
/// launch of a listed shape reads the weights of the first launch of that
/// shape instead of its own, so all layers share one layer's matrix, which
/// then stays in the L2. A timing run with it bounds what faster weight loads
/// (fewer bytes, or L2 hits) could save at that shape. Outputs are
/// meaningless while it is on.
pub(crate) fn shared_weights(m: usize, k: usize, t: usize, a_ptr: u64) -> u64 {
    struct Shared {
        all: bool,
        shapes: Vec<(usize, usize)>,
        first: Mutex<HashMap<(usize, usize), u64>>,
    }
    static S: OnceLock<Option<Shared>> = OnceLock::new();
    let shared = S.get_or_init(|| {
        let spec = std::env::var("KESTREL_SHARED_WEIGHTS").ok()?;
        let all = spec.trim() == "all";
        let shapes: Vec<(usize, usize)> = spec
            .split(',')
            .filter_map(|s| {
                let (m, k) = s.trim().split_once('x')?;
                Some((m.parse().ok()?, k.parse().ok()?))
            })
            .collect();
        if !all && shapes.is_empty() {
            eprintln!("KESTREL_SHARED_WEIGHTS={spec}: expected MxK,... or all; ignored");
            return None;
        }
        eprintln!("KESTREL_SHARED_WEIGHTS={spec}: layers share one weight matrix per shape; outputs are meaningless");
        Some(Shared {
            all,
            shapes,
            first: Mutex::new(HashMap::new()),
        })
    });
    let Some(sh) = shared else {
        return a_ptr;
    };
    if t > 8 || !(sh.all || sh.shapes.contains(&(m, k))) {
        return a_ptr;
    }
    let Ok(mut first) = sh.first.lock() else {
        return a_ptr;
    };
    *first.entry((m, k)).or_insert(a_ptr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_names_and_residues() {
        let r = parse("attention_pre, hgemm_1@1/4,bad@x,worse@4/4");
        assert_eq!(r.len(), 2, "malformed rules are dropped");
        assert_eq!((r[0].name.as_str(), r[0].select), ("attention_pre", Select::All));
        assert_eq!(
            (r[1].name.as_str(), r[1].select),
            ("hgemm_1", Select::Residue(1, 4))
        );
    }

    #[test]
    fn residues_pick_every_nth_launch_of_their_kernel_only() {
        let r = parse("hgemm_1@1/4,embed");
        let hits: Vec<u64> = (0..12)
            .filter(|&s| decide(&r, "hgemm_1", s) == Some(true))
            .collect();
        assert_eq!(hits, [1, 5, 9]);
        assert_eq!(decide(&r, "embed", 7), Some(true));
        assert_eq!(decide(&r, "attention_pre", 0), None);
    }
}
