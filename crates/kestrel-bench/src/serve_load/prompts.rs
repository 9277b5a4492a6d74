//! Request prompts: synthetic ones of random common English words (each a
//! single token in the vocabularies of current models, Gemma's included, so
//! a prompt of N words is about N tokens; the server's `usage` reports the
//! exact count) or the prompts of a JSONL file.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::{Error, Result};

/// Frequent English words; short and common enough to be one token each.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "on", "with", "as", "by", "at", "from",
    "his", "her", "it", "an", "be", "are", "this", "which", "or", "had", "not", "but", "one", "first",
    "after", "new", "were", "they", "has", "their", "also", "been", "two", "all", "who", "more", "other",
    "when", "time", "into", "during", "year", "years", "world", "would", "there", "city", "some", "most",
    "can", "many", "over", "where", "such", "made", "than", "them", "only", "while", "people", "school",
    "state", "war", "up", "out", "about", "then", "could", "these", "what", "him", "she", "we", "you", "may",
    "well", "used", "between", "under", "known", "both", "three", "part", "before", "family", "being",
    "life", "house", "church", "through", "group", "team", "north", "south", "east", "west", "early",
    "later", "each", "second", "music", "film", "game", "work", "day", "back", "way", "long", "small",
    "great", "large", "high", "old", "young", "good", "last", "own", "same", "name", "number", "place",
    "water", "river", "road", "area", "line", "home", "town", "power", "play", "side", "head", "king",
    "party", "field", "light", "form", "book", "story", "word", "point", "end", "body", "color", "money",
    "door", "car", "food", "tree", "sun", "land", "sea", "air", "fire", "horse", "child", "man", "woman",
    "hand", "eye", "face", "room", "night", "week", "month", "morning", "summer", "winter", "green", "red",
    "blue", "black", "white", "open", "close", "run", "walk", "read", "write", "make", "take", "give",
    "find", "think", "help", "turn", "start", "show", "hear", "keep", "hold", "bring", "leave", "move",
    "live", "believe", "change", "follow", "stop", "speak", "learn", "grow", "build", "stay", "fall", "cut",
    "reach", "kill", "raise", "pass", "sell", "decide", "return", "explain", "hope", "develop", "carry",
    "break", "receive", "agree", "support", "hit", "produce", "eat", "cover", "catch", "draw", "choose",
    "cause", "listen", "drive", "happy", "simple", "strong", "free", "clear", "full", "short", "easy",
    "hard", "real", "best", "better", "true", "whole", "local", "public", "able", "human", "national",
    "social", "major", "little", "very", "just", "now", "here", "often", "always", "never", "again", "still",
    "together", "already", "soon", "today", "almost",
];

/// `n` prompts of `words` random words each, reproducible from `seed`.
pub fn synthetic(n: usize, words: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut p = String::with_capacity(words * 7);
            for i in 0..words {
                if i > 0 {
                    p.push(' ');
                }
                p.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            p
        })
        .collect()
}

/// The prompts of a JSONL file: one `{"prompt": "..."}` object per line
/// (blank lines skipped).
pub fn load_jsonl(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::PromptsIo {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| Error::PromptsLine {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let prompt = v
            .get("prompt")
            .and_then(|p| p.as_str())
            .ok_or_else(|| bad("no string field \"prompt\"".into()))?;
        out.push(prompt.to_string());
    }
    if out.is_empty() {
        return Err(Error::PromptsEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// `n` prompts taken from `pool` in order, starting at `start` and wrapping
/// (so successive rounds use different prompts while the pool lasts).
pub fn cycle(pool: &[String], start: usize, n: usize) -> Vec<String> {
    if pool.is_empty() {
        return Vec::new();
    }
    (0..n).map(|i| pool[(start + i) % pool.len()].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_have_the_asked_word_count_and_follow_the_seed() {
        let a = synthetic(3, 50, 7);
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|p| p.split(' ').count() == 50));
        assert_eq!(a, synthetic(3, 50, 7));
        assert_ne!(a, synthetic(3, 50, 8));
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("kestrel-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, "{\"prompt\": \"a b\"}\n\n{\"prompt\": \"c\"}\n").unwrap();
        assert_eq!(load_jsonl(&good).unwrap(), vec!["a b", "c"]);
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"a\"}\n{\"text\": 1}\n").unwrap();
        let e = load_jsonl(&bad).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert_eq!(cycle(&["x".into(), "y".into()], 1, 3), vec!["y", "x", "y"]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
