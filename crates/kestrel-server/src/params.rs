//! From request fields to engine inputs: sampling parameters with their
//! ranges checked, the model name, and each prompt's fit in the context.

use kestrel_engine::SamplingParams;

use crate::error::ApiError;
use crate::protocol::CommonParams;

/// Most choices per prompt: each is a full sequence in the engine.
pub const MAX_N: usize = 16;
/// Most stop strings: each is matched against every token's text.
pub const MAX_STOPS: usize = 16;
/// OpenAI's default temperature, used when a request gives none.
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// What a completion request asks for, before the prompt is known.
#[derive(Clone, Debug)]
pub struct Request {
    pub params: SamplingParams,
    /// `max_tokens` as given; `None` means `default_max_tokens`.
    pub max_tokens: Option<usize>,
    /// Used when `max_tokens` is not given, shrunk to what the context has
    /// room for; `None` fills the context (chat's default).
    pub default_max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// A non-negative integer field, or a 400 naming it.
fn count(name: &str, value: i64, expected: &str) -> Result<usize, ApiError> {
    usize::try_from(value)
        .map_err(|_| ApiError::invalid_param(name, format!("`{name}` is {value}, expected {expected}")))
}

/// Checks `model` against the served name (absent means the served model).
pub fn check_model(requested: Option<&str>, served: &str) -> Result<(), ApiError> {
    match requested {
        Some(m) if m != served => Err(ApiError::model_not_found(m, served)),
        _ => Ok(()),
    }
}

/// Reads the shared fields; `max_tokens` and `logprobs` come from the
/// endpoint (their names differ between chat and completions).
pub fn parse(
    c: &CommonParams,
    max_tokens: Option<i64>,
    logprobs: Option<usize>,
) -> Result<Request, ApiError> {
    let max_tokens = match max_tokens {
        Some(v) => {
            let v = count("max_tokens", v, "an integer >= 1")?;
            if v == 0 {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    "`max_tokens` is 0, expected an integer >= 1",
                ));
            }
            Some(v)
        }
        None => None,
    };
    let n = match c.n {
        Some(v) => count("n", v, "an integer in [1, 16]")?,
        None => 1,
    };
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid_param(
            "n",
            format!("`n` is {n}, expected an integer in [1, {MAX_N}]"),
        ));
    }
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(v) => count("top_k", v, "an integer >= 0 (0 or -1 = off)")?,
    };
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("`stop` has {} strings, expected at most {MAX_STOPS}", stop.len()),
        ));
    }
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        // OpenAI seeds are any integer: negative ones keep their bits.
        seed: c.seed.map(|s| s as u64),
        max_tokens: max_tokens.unwrap_or(1),
        stop,
        stop_token_ids: c.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs,
    };
    params.validate()?;
    Ok(Request {
        params,
        max_tokens,
        default_max_tokens: None,
        n,
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// The parameters for one prompt: `max_tokens` filled in (the rest of the
/// context when not given), or a 400 with both numbers when the prompt and
/// the requested output do not fit.
pub fn fit(req: &Request, prompt_len: usize, max_model_len: usize) -> Result<SamplingParams, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid_param(
            "prompt",
            "the prompt is empty (no tokens)",
        ));
    }
    let room = max_model_len.saturating_sub(prompt_len);
    let max_tokens = match req.max_tokens {
        Some(m) if prompt_len + m > max_model_len => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!(
                    "this model's maximum context length is {max_model_len} tokens, but {} tokens were \
                     requested ({prompt_len} in the prompt + {m} for the completion); shorten the \
                     prompt or lower max_tokens",
                    prompt_len + m
                ),
            ))
        }
        Some(m) => m,
        None if room == 0 => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "this model's maximum context length is {max_model_len} tokens, but the prompt \
                     has {prompt_len} tokens, leaving no room for a completion"
                ),
            ))
        }
        None => req.default_max_tokens.map_or(room, |d| d.min(room)),
    };
    Ok(SamplingParams {
        max_tokens,
        ..req.params.clone()
    })
}

/// Choice `j` of `n` gets its own seed, so `n > 1` with a seed gives
/// different (yet reproducible) samples.
pub fn for_choice(params: &SamplingParams, j: usize) -> SamplingParams {
    SamplingParams {
        seed: params.seed.map(|s| s.wrapping_add(j as u64)),
        ..params.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(f: impl FnOnce(&mut CommonParams)) -> CommonParams {
        let mut c = CommonParams::default();
        f(&mut c);
        c
    }

    #[test]
    fn ranges_name_the_parameter() {
        let cases: Vec<(&str, CommonParams, Option<i64>)> = vec![
            ("n", common(|c| c.n = Some(0)), None),
            ("n", common(|c| c.n = Some(17)), None),
            ("top_k", common(|c| c.top_k = Some(-2)), None),
            ("temperature", common(|c| c.temperature = Some(2.5)), None),
            ("max_tokens", CommonParams::default(), Some(0)),
            ("max_tokens", CommonParams::default(), Some(-5)),
        ];
        for (name, c, max) in cases {
            let e = parse(&c, max, None).expect_err(name);
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(name), "{e}");
        }
    }

    #[test]
    fn context_overflow_names_both_numbers() {
        let req = parse(&CommonParams::default(), Some(100), None).expect("valid");
        let e = fit(&req, 30, 120).expect_err("30 + 100 > 120");
        assert!(
            e.message.contains("120") && e.message.contains("130"),
            "{}",
            e.message
        );
        assert_eq!(fit(&req, 20, 120).expect("fits").max_tokens, 100);
        let open = parse(&CommonParams::default(), None, None).expect("valid");
        assert_eq!(fit(&open, 20, 120).expect("fits").max_tokens, 100);
        assert!(fit(&open, 120, 120).is_err());
        // A default (completions' 16) is a cap that shrinks to the room left.
        let capped = Request {
            default_max_tokens: Some(16),
            ..open
        };
        assert_eq!(fit(&capped, 20, 120).expect("fits").max_tokens, 16);
        assert_eq!(fit(&capped, 110, 120).expect("fits").max_tokens, 10);
        assert!(fit(&capped, 120, 120).is_err());
    }

    #[test]
    fn choices_get_distinct_seeds() {
        let p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        assert_eq!(for_choice(&p, 0).seed, Some(7));
        assert_eq!(for_choice(&p, 2).seed, Some(9));
    }
}
