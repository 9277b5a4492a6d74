//! The default model's tokenizer against llama.cpp's reference outputs.

mod common;

use common::{gemma, ids, reference_json};

#[test]
fn every_tokenize_json_entry_matches_llama_cpp() {
    let tok = gemma();
    let entries = reference_json("tokenize.json");
    let entries = entries.as_array().expect("tokenize.json is a list");
    assert!(!entries.is_empty());
    let mut matched = 0;
    for e in entries {
        let text = e["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&e["ids"]),
            "ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&e["ids_with_bos"]),
            "ids_with_bos of {text:?}"
        );
        matched += 1;
    }
    println!(
        "tokenize.json: {matched}/{} entries match llama.cpp",
        entries.len()
    );
}

#[test]
fn greedy_prompt_ids_match_llama_cpp() {
    let tok = gemma();
    let entries = reference_json("greedy.json");
    let entries = entries.as_array().expect("greedy.json is a list");
    assert!(!entries.is_empty());
    for e in entries {
        let prompt = e["prompt"].as_str().expect("prompt");
        assert_eq!(
            tok.encode(prompt, tok.add_bos_default()).unwrap(),
            ids(&e["prompt_ids"]),
            "prompt_ids of {prompt:?}"
        );
    }
    println!("greedy.json: {} prompts match llama.cpp", entries.len());
}

#[test]
fn greedy_continuations_decode_to_the_reference_text() {
    let tok = gemma();
    for e in reference_json("greedy.json").as_array().expect("list") {
        let tokens = ids(&e["tokens"]);
        assert_eq!(tok.decode(&tokens).unwrap(), e["text"].as_str().unwrap());
        for step in e["steps"].as_array().unwrap() {
            let id = step["id"].as_u64().unwrap() as u32;
            assert_eq!(tok.token_text(id).unwrap(), step["piece"].as_str().unwrap());
        }
    }
}

#[test]
fn reference_strings_round_trip() {
    let tok = gemma();
    for e in reference_json("tokenize.json").as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let enc = tok.encode(text, true).unwrap();
        // The reference strings contain <start_of_turn>-style control text,
        // which decode hides and decode_with_special shows.
        assert_eq!(tok.decode_with_special(&enc[1..]).unwrap(), text);
        if !text.contains("_of_turn>") {
            assert_eq!(tok.decode(&enc).unwrap(), text);
        }
    }
}

#[test]
fn special_ids_and_flags_of_the_default_model() {
    let tok = gemma();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.eos_id(), Some(1));
    assert!(tok.add_bos_default());
    let eot = tok.token_to_id("<end_of_turn>").unwrap();
    assert_eq!(eot, 106);
    assert_eq!(tok.eos_ids(), &[1, 106]);
    assert!(tok.is_eog(106) && tok.is_eog(1) && !tok.is_eog(2));
    assert_eq!(tok.token_text(2).as_deref(), Some("<bos>"));
    assert_eq!(tok.token_text(248).as_deref(), Some("\n"), "<0x0A>");
    assert_eq!(tok.token_text(506).as_deref(), Some(" the"));
    assert_eq!(tok.token_text(u32::MAX), None);
    assert_eq!(tok.decode(&[2, 105, 9259, 106]).unwrap(), "Hello");
}
