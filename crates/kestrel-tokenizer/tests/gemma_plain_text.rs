//! `encode_text`: control-token text stays text (llama.cpp's parse_special
//! off, as llama-perplexity tokenizes files), user-defined tokens still match.

mod common;

#[test]
fn control_token_text_is_plain_text_in_encode_text() {
    let tok = common::gemma();
    let text = "Turn: <start_of_turn>user\n\n\nhi<end_of_turn>";
    let special = tok.encode(text, false).unwrap();
    let plain = tok.encode_text(text, false).unwrap();
    let start = tok.token_to_id("<start_of_turn>").unwrap();
    let end = tok.token_to_id("<end_of_turn>").unwrap();
    assert!(special.contains(&start) && special.contains(&end), "{special:?}");
    assert!(!plain.contains(&start) && !plain.contains(&end), "{plain:?}");
    // Both decode back to the same text.
    assert_eq!(tok.decode_with_special(&plain).unwrap(), text);
    // Without control-token text the two agree, user-defined tokens (Gemma's
    // newline runs) included.
    let t = "line one\n\n\nline two\t\tend";
    assert_eq!(tok.encode(t, true).unwrap(), tok.encode_text(t, true).unwrap());
}
