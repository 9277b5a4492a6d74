//! The prompts a validation decodes: a built-in set chosen to exercise
//! different parts of a model (prose, code, numbers, other scripts, a long
//! prefill, a chat turn), or one prompt per line of a file.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// A prompt with a short name for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub name: String,
    pub text: String,
}

/// (name, text). Varied on purpose: a kernel bug often shows only on some
/// inputs (long rows, rare tokens, many positions).
const BUILTIN: &[(&str, &str)] = &[
    (
        "story",
        "Once upon a time, in a village at the edge of a great forest, there lived",
    ),
    (
        "code",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    ),
    ("facts", "The capital of France is Paris. The capital of Japan is"),
    (
        "arithmetic",
        "Q: What is 17 multiplied by 23? Show the steps.\nA:",
    ),
    (
        "multilingual",
        "Traduisez en anglais : « Le café est très chaud. » Übersetzung: 咖啡很热。 Translation:",
    ),
    ("list", "Here is a list of ten common birds of prey:\n1."),
    (
        "long",
        "The kestrel is a small falcon that hunts by hovering over open ground, \
         holding its head perfectly still against the wind while its wings beat rapidly. \
         When it spots a vole or a large insect in the grass below, it drops in stages \
         before the final plunge. Kestrels nest in old crows' nests, tree holes, cliff \
         ledges and increasingly on buildings in towns, and a pair may raise four to six \
         chicks in a good year. Their numbers are watched closely by ornithologists because \
         changes in farming practice affect the small mammals they depend on. In this essay \
         we describe the three main reasons why",
    ),
    (
        "chat",
        "<start_of_turn>user\nWrite a haiku about debugging.<end_of_turn>\n<start_of_turn>model\n",
    ),
];

/// The built-in prompts.
pub fn builtin() -> Vec<Prompt> {
    BUILTIN
        .iter()
        .map(|(name, text)| Prompt {
            name: name.to_string(),
            text: text.to_string(),
        })
        .collect()
}

/// One prompt per non-empty line of `path`, used verbatim (no escapes).
pub fn from_file(path: &Path) -> Result<Vec<Prompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading prompts from {}", path.display()))?;
    let prompts: Vec<Prompt> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Prompt {
            name: format!("line{}", i + 1),
            text: l.to_string(),
        })
        .collect();
    if prompts.is_empty() {
        bail!("{} holds no prompts (expected one per line)", path.display());
    }
    Ok(prompts)
}

/// The prompts to run: from the file if given, else the built-in set, cut to
/// the first `limit` when given.
pub fn select(file: Option<&Path>, limit: Option<usize>) -> Result<Vec<Prompt>> {
    let mut prompts = match file {
        Some(p) => from_file(p)?,
        None => builtin(),
    };
    if let Some(n) = limit {
        if n == 0 {
            bail!("--num-prompts is 0, expected at least 1");
        }
        prompts.truncate(n);
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_set_is_varied_and_named_uniquely() {
        let p = builtin();
        assert_eq!(p.len(), 8);
        let mut names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 8);
        assert!(
            p.iter().any(|p| p.text.len() > 500),
            "one long prompt for prefill"
        );
        assert!(p.iter().any(|p| !p.text.is_ascii()), "one prompt outside ASCII");
    }

    #[test]
    fn file_prompts_skip_blank_lines_and_limit_applies() {
        let path = std::env::temp_dir().join(format!("kestrel-validate-prompts-{}.txt", std::process::id()));
        std::fs::write(&path, "first\n\n  \nsecond\nthird\n").unwrap();
        let all = select(Some(&path), None).unwrap();
        assert_eq!(
            all.iter().map(|p| p.text.as_str()).collect::<Vec<_>>(),
            ["first", "second", "third"]
        );
        assert_eq!(all[1].name, "line4");
        assert_eq!(select(Some(&path), Some(2)).unwrap().len(), 2);
        assert!(select(Some(&path), Some(0)).is_err());
        std::fs::write(&path, "\n\n").unwrap();
        let err = select(Some(&path), None).unwrap_err().to_string();
        assert!(err.contains("no prompts"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
