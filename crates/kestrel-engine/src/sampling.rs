//! Token sampling: turns one decoding step's logits into the next token.
//!
//! # Chain order
//!
//! Each call to [`Sampler::sample`] runs, in this order (the order vLLM uses):
//!
//! 1. **Repetition penalty** over every distinct token of the prompt *and* the
//!    generated output: positive logits are divided by the penalty, negative
//!    ones multiplied, so a penalty > 1 always makes a seen token less likely.
//! 2. **Presence / frequency penalties** over the generated output only
//!    (OpenAI semantics): `logit -= presence * [count > 0] + frequency * count`.
//! 3. NaN logits become `-inf` (never chosen) and `+inf` becomes `f32::MAX`, so
//!    a broken model output cannot poison the softmax or panic.
//! 4. **Greedy** when `temperature == 0`: argmax, lowest index on ties. The
//!    truncation filters below cannot remove the argmax, so they are skipped.
//! 5. Otherwise **temperature**, then **top-k**, then **top-p** (on the
//!    distribution renormalised over what top-k kept), then **min-p** (relative
//!    to the most likely token), then a draw from the ChaCha RNG.
//!
//! Reported log-probabilities are the log-softmax of the *penalised* logits,
//! before temperature and truncation: like OpenAI, they describe the model's
//! distribution, not the sampler's. They can be `-inf` for masked tokens.
//!
//! # Cost on large vocabularies
//!
//! Gemma 3 has 262,144 tokens, so the whole vocabulary is never sorted:
//!
//! - top-k (and the top log-probabilities) stream the vocabulary through a
//!   k-sized heap, or use `select_nth_unstable` when k is large;
//! - top-p builds a histogram of probability mass over the scaled logits,
//!   keeps every token of the buckets above the one where the mass reaches
//!   `p` without sorting them, and sorts only that boundary bucket, lazily
//!   (best 64, then the next 128, ...) until the exact cut is found;
//! - min-p is a plain threshold applied while the candidates are gathered.

use std::collections::{BinaryHeap, HashMap};

use kestrel_backend::DeviceSample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Highest accepted temperature. OpenAI's range is [0, 2]; we keep it because
/// above 2 the distribution is close to uniform over the vocabulary and such
/// requests are almost always mistakes. A server wanting more can bypass
/// [`SamplingParams::validate`]: the sampler itself handles any finite value.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Most top log-probabilities one step may report (OpenAI's `top_logprobs`
/// limit), which bounds the per-token response size.
pub const MAX_LOGPROBS: usize = 20;

/// Size of the first batch of candidates sorted by lazy top-p; each further
/// batch doubles. Typical `p` values are reached within the first batch.
const TOP_P_FIRST_BATCH: usize = 64;

/// Per-request sampling settings. Deserialising fills absent fields from
/// [`Default`], so a request may name only what it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 disables.
    pub min_p: f32,
    /// Penalty on tokens seen in the prompt or the output; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// RNG seed; `None` draws a random one (see [`Sampler::seed`]).
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings: generation ends before the first one found in the output.
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to EOS).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// When `Some(n)`, report the chosen token's log-probability and the top `n`.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// Greedy decoding of at most 256 tokens with every filter and penalty off.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Why sampling settings or inputs were rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter lies outside its allowed range (or is NaN/infinite).
    #[error("sampling parameter `{name}` is {value}, expected {expected}")]
    OutOfRange {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// An empty stop string would match before any output.
    #[error("sampling parameter `stop[{index}]` is an empty string, expected a non-empty stop string")]
    EmptyStop { index: usize },
    /// The model produced no logits, so there is no token to choose.
    #[error("logits passed to the sampler are empty, expected one logit per vocabulary token")]
    EmptyLogits,
}

fn out_of_range(name: &'static str, value: impl std::fmt::Display, expected: &'static str) -> SamplingError {
    SamplingError::OutOfRange {
        name,
        value: value.to_string(),
        expected,
    }
}

impl SamplingParams {
    /// Greedy with nothing that needs the logits on the host: the argmax
    /// (the lowest id on ties, as the sampler picks) is the whole decision,
    /// so it can be taken on the device.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logprobs.is_none()
    }

    /// Checks every parameter against its allowed range (OpenAI's where it
    /// defines one); the first violation is returned.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(0.0..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(out_of_range(
                "temperature",
                self.temperature,
                "a number in [0, 2] (0 = greedy)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range("top_p", self.top_p, "a number in (0, 1] (1 = off)"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(out_of_range("min_p", self.min_p, "a number in [0, 1] (0 = off)"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(out_of_range(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0 (1 = off)",
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(out_of_range(
                "presence_penalty",
                self.presence_penalty,
                "a number in [-2, 2] (0 = off)",
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(out_of_range(
                "frequency_penalty",
                self.frequency_penalty,
                "a number in [-2, 2] (0 = off)",
            ));
        }
        if self.max_tokens < 1 {
            return Err(out_of_range("max_tokens", self.max_tokens, "an integer >= 1"));
        }
        if let Some(n) = self.logprobs {
            if n > MAX_LOGPROBS {
                return Err(out_of_range("logprobs", n, "an integer in [0, 20]"));
            }
        }
        if let Some(index) = self.stop.iter().position(String::is_empty) {
            return Err(SamplingError::EmptyStop { index });
        }
        Ok(())
    }
}

/// One sampling decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token id (always `< logits.len()`).
    pub token: u32,
    /// Log-probability of `token` under the penalised distribution; `Some`
    /// exactly when `logprobs` was requested.
    pub logprob: Option<f32>,
    /// The `n` most likely `(token, logprob)` pairs, most likely first (ties
    /// by lowest id); empty unless `logprobs` was requested.
    pub top: Vec<(u32, f32)>,
}

impl Sampled {
    /// A decision without logprobs (greedy argmaxes taken on the device,
    /// and draws of requests that asked for none).
    pub fn token_only(token: u32) -> Sampled {
        Sampled {
            token,
            logprob: None,
            top: Vec::new(),
        }
    }
}

/// Samples the tokens of one sequence. It owns the sequence's RNG, so a fixed
/// seed replays the same choices, and its output token counts for penalties.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    /// Distinct prompt tokens, sorted, for the repetition penalty.
    prompt_set: Vec<u32>,
    /// Length of the prompt `prompt_set` was built from (`None`: not built).
    prompt_len: Option<usize>,
    /// How often each token occurs in the generated output.
    output_counts: HashMap<u32, u32>,
    /// How many generated tokens `output_counts` covers; counting is
    /// incremental because the output only grows between steps.
    counted: usize,
    /// Reused buffers, so a step allocates nothing once warm.
    candidates: Vec<(f32, u32)>,
    boundary: Vec<(f32, u32)>,
    heap: BinaryHeap<Ranked>,
}

impl Sampler {
    /// Makes a sampler for one sequence. `params` should have passed
    /// [`SamplingParams::validate`]; out-of-range values do not panic but are
    /// clamped to the nearest meaningful behaviour.
    pub fn new(params: &SamplingParams) -> Sampler {
        // Drawing the seed up front (rather than seeding from the OS directly)
        // lets callers log it and replay a request exactly.
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Sampler {
            params: params.clone(),
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt_set: Vec::new(),
            prompt_len: None,
            output_counts: HashMap::new(),
            counted: 0,
            candidates: Vec::new(),
            boundary: Vec::new(),
            heap: BinaryHeap::new(),
        }
    }

    /// The seed in use: the requested one, or the one drawn at random.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from `logits` (one per vocabulary entry).
    ///
    /// `prompt` must stay the same for the sampler's life, and `generated` may
    /// only grow between calls (it is counted incrementally; if it shrinks the
    /// counts are rebuilt). Ids outside the vocabulary are ignored.
    ///
    /// `logits` is used as scratch: on return it holds the penalised logits
    /// (NaN replaced by `-inf`, `+inf` by `f32::MAX`).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
    ) -> Result<Sampled, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        self.apply_penalties(logits, prompt, generated);
        let best = sanitize_and_argmax(logits);
        let max = logits[best];

        // Reported before drawing because drawing reuses the candidate buffer.
        let report = self.params.logprobs.map(|n| {
            let lse = log_sum_exp(logits, max);
            (lse, self.top_logprobs(logits, lse, n))
        });

        let temperature = self.params.temperature;
        let inv_t = 1.0 / temperature;
        // A zero, negative, NaN or denormal temperature (1/t overflows) has no
        // usable scale: decode greedily.
        let token = if temperature > 0.0 && inv_t.is_finite() && max > f32::NEG_INFINITY {
            self.draw(logits, best, inv_t)
        } else {
            best
        };

        Ok(match report {
            Some((lse, top)) => Sampled {
                token: token as u32,
                logprob: Some(log_prob(logits[token], lse)),
                top,
            },
            None => Sampled::token_only(token as u32),
        })
    }

    /// The penalties in effect: (repetition factor if used, presence,
    /// frequency, whether the count penalties are used).
    fn penalty_settings(&self) -> (Option<f32>, f32, f32, bool) {
        let rep = self.params.repetition_penalty;
        let use_rep = rep != 1.0 && rep > 0.0 && rep.is_finite();
        let presence = finite_or_zero(self.params.presence_penalty);
        let frequency = finite_or_zero(self.params.frequency_penalty);
        (
            use_rep.then_some(rep),
            presence,
            frequency,
            presence != 0.0 || frequency != 0.0,
        )
    }

    /// Brings the output counts (and, for the repetition penalty, the
    /// distinct prompt tokens) up to date.
    fn update_counts(&mut self, prompt: &[u32], generated: &[u32], use_rep: bool) {
        if generated.len() < self.counted {
            self.output_counts.clear();
            self.counted = 0;
        }
        for &id in &generated[self.counted..] {
            let count = self.output_counts.entry(id).or_insert(0);
            *count = count.saturating_add(1);
        }
        self.counted = generated.len();
        if use_rep && self.prompt_len != Some(prompt.len()) {
            self.prompt_set.clear();
            self.prompt_set.extend_from_slice(prompt);
            self.prompt_set.sort_unstable();
            self.prompt_set.dedup();
            self.prompt_len = Some(prompt.len());
        }
    }

    /// This step's decision in the form a backend takes on the device
    /// (`Backend::sample_rows`): the same penalties, filters and single
    /// random draw as [`Sampler::sample`], which this replaces for the step.
    /// (Only when every logit is -inf does the host skip the draw that this
    /// makes; the device then returns token 0, as the host does.)
    pub fn device_request(&mut self, prompt: &[u32], generated: &[u32], vocab: usize) -> DeviceSample {
        let (rep, _, _, use_counts) = self.penalty_settings();
        let mut penalties = Vec::new();
        if rep.is_some() || use_counts {
            self.update_counts(prompt, generated, rep.is_some());
            if rep.is_some() {
                for &id in &self.prompt_set {
                    penalties.push((id, self.output_counts.get(&id).copied().unwrap_or(0)));
                }
                for (&id, &count) in &self.output_counts {
                    if self.prompt_set.binary_search(&id).is_err() {
                        penalties.push((id, count));
                    }
                }
            } else {
                penalties.extend(self.output_counts.iter().map(|(&id, &c)| (id, c)));
            }
        }
        let mut d = self.device_decision(vocab, penalties);
        if !d.greedy {
            d.u = self.rng.random::<f64>();
        }
        d
    }

    /// What `device_request` would return when no penalty applies (so the
    /// decision needs neither the prompt nor the tokens generated so far),
    /// without its random draw (u = 0); `None` when a penalty applies. The
    /// engine asks the backend with it whether a step's draw can be queued
    /// on the device before the previous step's token is known.
    pub fn device_shape(&self, vocab: usize) -> Option<DeviceSample> {
        let (rep, _, _, use_counts) = self.penalty_settings();
        (rep.is_none() && !use_counts).then(|| self.device_decision(vocab, Vec::new()))
    }

    /// The device form of this sampler's settings with `penalties`, before
    /// the draw (u = 0).
    fn device_decision(&self, vocab: usize, penalties: Vec<(u32, u32)>) -> DeviceSample {
        let (rep, presence, frequency, use_counts) = self.penalty_settings();
        let temperature = self.params.temperature;
        let inv_t = 1.0 / temperature;
        let greedy = !(temperature > 0.0 && inv_t.is_finite());
        let min_p = self.params.min_p.min(1.0);
        DeviceSample {
            greedy,
            inv_t: if greedy { 1.0 } else { inv_t },
            top_k: match self.params.top_k {
                k if k == 0 || k >= vocab => 0,
                k => k as u32,
            },
            // `< 1.0` is false for NaN, which therefore means "off".
            top_p: if self.params.top_p < 1.0 {
                self.params.top_p.max(0.0)
            } else {
                2.0
            },
            min_p_log: if min_p > 0.0 {
                min_p.ln()
            } else {
                f32::NEG_INFINITY
            },
            repetition: rep.unwrap_or(1.0),
            presence: if use_counts { presence } else { 0.0 },
            frequency: if use_counts { frequency } else { 0.0 },
            u: 0.0,
            penalties,
        }
    }

    fn apply_penalties(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let (rep, presence, frequency, use_counts) = self.penalty_settings();
        let use_rep = rep.is_some();
        let rep = rep.unwrap_or(1.0);
        if !use_rep && !use_counts {
            return;
        }
        self.update_counts(prompt, generated, use_rep);

        if use_rep {
            // Each distinct token is penalised once, however often it occurs.
            for &id in &self.prompt_set {
                repetition(logits, id, rep);
            }
            for &id in self.output_counts.keys() {
                if self.prompt_set.binary_search(&id).is_err() {
                    repetition(logits, id, rep);
                }
            }
        }
        if use_counts {
            for (&id, &count) in &self.output_counts {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit -= presence + frequency * count as f32;
                }
            }
        }
    }

    /// The `n` best tokens by penalised logit, with their log-probabilities.
    fn top_logprobs(&mut self, logits: &[f32], lse: f64, n: usize) -> Vec<(u32, f32)> {
        let ranked = logits.iter().enumerate().map(|(i, &l)| (l, i as u32));
        select_best(&mut self.candidates, &mut self.heap, ranked, n);
        self.candidates.sort_unstable_by(best_first);
        self.candidates
            .iter()
            .map(|&(l, id)| (id, log_prob(l, lse)))
            .collect()
    }

    /// Temperature, top-k, top-p, min-p, then a draw. `logits[best]` is the
    /// finite maximum.
    fn draw(&mut self, logits: &[f32], best: usize, inv_t: f32) -> usize {
        self.build_candidates(logits, logits[best], inv_t);
        // Scaled logits are shifted so the best is 0: exp cannot overflow
        // and the weights need no normalisation before the draw.
        let mut total = 0.0f64;
        for candidate in &mut self.candidates {
            candidate.0 = candidate.0.exp();
            total += f64::from(candidate.0);
        }
        let mut u = self.rng.random::<f64>() * total;
        for &(w, id) in &self.candidates {
            let w = f64::from(w);
            if u < w {
                return id as usize;
            }
            u -= w;
        }
        // Rounding left `u` just past the last weight: that token was the draw.
        self.candidates
            .iter()
            .rev()
            .find(|&&(w, _)| w > 0.0)
            .map_or(best, |&(_, id)| id as usize)
    }

    /// Fills `self.candidates` with `((logit - max) / temperature, id)` for
    /// every token that survives top-k, top-p and min-p, in no set order.
    fn build_candidates(&mut self, logits: &[f32], max: f32, inv_t: f32) {
        let top_k = match self.params.top_k {
            k if k == 0 || k >= logits.len() => None,
            k => Some(k),
        };
        // `< 1.0` is false for NaN, which therefore means "off".
        let top_p = (self.params.top_p < 1.0).then(|| f64::from(self.params.top_p.max(0.0)));
        // p_i / p_max = exp(s_i), so min-p is the threshold s_i >= ln(min_p).
        // Min-p and top-p both keep a best-first prefix, so applying min-p
        // early (while filling) leaves the same set, provided top-p's mass is
        // still taken over everything top-k kept.
        let min_p = self.params.min_p.min(1.0);
        let min_p_cut = if min_p > 0.0 {
            min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        // -inf tokens have no probability and are never candidates.
        let scaled = logits
            .iter()
            .enumerate()
            .map(move |(i, &l)| ((l - max) * inv_t, i as u32))
            .filter(|&(s, _)| s > f32::NEG_INFINITY);

        match (top_k, top_p) {
            (Some(k), None) => {
                let ranked = scaled.filter(|&(s, _)| s >= min_p_cut);
                select_best(&mut self.candidates, &mut self.heap, ranked, k);
            }
            (Some(k), Some(p)) => {
                select_best(&mut self.candidates, &mut self.heap, scaled, k);
                let mass: f64 = self.candidates.iter().map(|&(s, _)| weight(s)).sum();
                self.candidates.retain(|&(s, _)| s >= min_p_cut);
                truncate_top_p(&mut self.candidates, p * mass);
            }
            (None, Some(p)) => self.top_p_candidates(logits, max, inv_t, p, min_p_cut),
            (None, None) => {
                self.candidates.clear();
                self.candidates.extend(scaled.filter(|&(s, _)| s >= min_p_cut));
            }
        }
    }

    /// Top-p over the whole vocabulary without sorting it: a histogram of
    /// probability mass by scaled logit finds the bucket where the mass
    /// reaches `p`; tokens in better buckets are kept unsorted and only the
    /// boundary bucket is sorted (lazily) to find the exact cut.
    fn top_p_candidates(&mut self, logits: &[f32], max: f32, inv_t: f32, p: f64, min_p_cut: f32) {
        let mut hist = [0.0f64; TAIL_BUCKET];
        for &l in logits {
            let s = (l - max) * inv_t;
            // -inf lands in the tail bucket too.
            let b = mass_bucket(s);
            if b < TAIL_BUCKET {
                hist[b] += weight(s);
            }
        }
        let mass: f64 = hist.iter().sum();
        let target = p * mass;
        // First bucket at which the cumulative mass reaches the target; if
        // rounding keeps it just short, every bucket but the tail is kept.
        let mut above = 0.0f64;
        let mut boundary = TAIL_BUCKET;
        for (b, &m) in hist.iter().enumerate() {
            if above + m >= target {
                boundary = b;
                break;
            }
            above += m;
        }

        self.candidates.clear();
        self.boundary.clear();
        for (i, &l) in logits.iter().enumerate() {
            let s = (l - max) * inv_t;
            if s >= min_p_cut {
                let b = mass_bucket(s);
                if b < boundary {
                    self.candidates.push((s, i as u32));
                } else if b == boundary && b < TAIL_BUCKET {
                    self.boundary.push((s, i as u32));
                }
            }
        }
        truncate_top_p(&mut self.boundary, target - above);
        self.candidates.extend_from_slice(&self.boundary);
    }
}

/// Scores `token` under the raw distribution of one logits row (no
/// penalty, temperature or truncation): its log-probability and the `n`
/// most likely `(token, logprob)` pairs, most likely first (ties by lowest
/// id). This is how prompt tokens are scored. `logits` is used as scratch
/// (NaN becomes `-inf`); a `token` outside the row scores `-inf`.
pub fn score_token(
    logits: &mut [f32],
    token: u32,
    n: usize,
) -> Result<(f32, Vec<(u32, f32)>), SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let best = sanitize_and_argmax(logits);
    let lse = log_sum_exp(logits, logits[best]);
    let logprob = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&l| log_prob(l, lse));
    let mut candidates = Vec::with_capacity(n);
    let mut heap = BinaryHeap::with_capacity(n);
    let ranked = logits.iter().enumerate().map(|(i, &l)| (l, i as u32));
    select_best(&mut candidates, &mut heap, ranked, n);
    candidates.sort_unstable_by(best_first);
    let top = candidates.iter().map(|&(l, id)| (id, log_prob(l, lse))).collect();
    Ok((logprob, top))
}

/// The top-p mass histogram has buckets 1/8 of a scaled logit wide (a
/// probability ratio of 1.13) down to -48, then one tail bucket for all that
/// is lower. Tail tokens are left out of the mass and never kept: even four
/// million of them weigh under 1e-14 of the best token, far below the
/// resolution of f32 `top_p` (the largest value under 1 is 1 - 6e-8), and
/// skipping their `exp` matters at low temperature, where most of a large
/// vocabulary ends up there.
const TAIL_BUCKET: usize = 8 * 48;
const BUCKETS_PER_UNIT: f32 = 8.0;

/// Histogram bucket of a scaled logit `s <= 0`; better tokens get lower ones.
fn mass_bucket(s: f32) -> usize {
    // Clamped in f32 first (-inf goes to the tail, -0.0 to bucket 0) so the
    // cast is to u32, a single instruction: a saturating cast to usize cost
    // a quarter of the top-p time on a 262k vocabulary.
    (-s * BUCKETS_PER_UNIT).min(TAIL_BUCKET as f32) as u32 as usize
}

/// Up to this many, the best `n` are kept in a heap while streaming over the
/// vocabulary: one comparison per token and no vocabulary-sized buffer.
const HEAP_SELECTION_MAX: usize = 1024;

/// Puts the best `n` items of `ranked` (by [`best_first`]) into `out`, in no
/// set order.
fn select_best(
    out: &mut Vec<(f32, u32)>,
    heap: &mut BinaryHeap<Ranked>,
    ranked: impl Iterator<Item = (f32, u32)>,
    n: usize,
) {
    out.clear();
    if n == 0 {
        return;
    }
    if n <= HEAP_SELECTION_MAX {
        // The heap's top is the worst item kept so far; `floor` caches its
        // value so most tokens are rejected by one float comparison.
        heap.clear();
        let mut floor = f32::NEG_INFINITY;
        for item in ranked {
            if heap.len() < n {
                heap.push(Ranked(item));
                if heap.len() == n {
                    floor = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0);
                }
            } else if item.0 >= floor {
                if let Some(mut worst) = heap.peek_mut() {
                    if best_first(&item, &worst.0).is_lt() {
                        *worst = Ranked(item);
                    }
                }
                floor = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0 .0);
            }
        }
        out.extend(heap.drain().map(|r| r.0));
    } else {
        out.extend(ranked);
        if n < out.len() {
            out.select_nth_unstable_by(n - 1, best_first);
            out.truncate(n);
        }
    }
}

/// A candidate ordered so that worse compares greater, making
/// `BinaryHeap`'s top the worst one kept.
struct Ranked((f32, u32));

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        best_first(&self.0, &other.0)
    }
}

/// Sorts the best of `cands` lazily and cuts it after the shortest prefix
/// whose weight reaches `target`: the best 64 are selected and sorted, then
/// the next 128, and so on, so a small kept set never pays for a full sort.
fn truncate_top_p(cands: &mut Vec<(f32, u32)>, target: f64) {
    let n = cands.len();
    let mut sorted = 0;
    let mut batch = TOP_P_FIRST_BATCH;
    let mut cumulative = 0.0f64;
    while sorted < n {
        let end = sorted.saturating_add(batch).min(n);
        if end < n {
            cands[sorted..].select_nth_unstable_by(end - sorted - 1, best_first);
        }
        cands[sorted..end].sort_unstable_by(best_first);
        for i in sorted..end {
            cumulative += weight(cands[i].0);
            if cumulative >= target {
                cands.truncate(i + 1);
                return;
            }
        }
        sorted = end;
        batch = batch.saturating_mul(2);
    }
}

/// Descending by value, then ascending by id: a total order, so selection
/// and ties are deterministic.
fn best_first(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

fn weight(scaled: f32) -> f64 {
    f64::from(scaled.exp())
}

fn repetition(logits: &mut [f32], id: u32, penalty: f32) {
    if let Some(logit) = logits.get_mut(id as usize) {
        *logit = if *logit > 0.0 {
            *logit / penalty
        } else {
            *logit * penalty
        };
    }
}

fn finite_or_zero(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Replaces NaN by -inf (never chosen) and +inf by `f32::MAX` (+inf would
/// make the softmax NaN: inf - inf), and returns the index of the largest
/// logit, the lowest one on ties (0 if all are -inf). One pass, because on a
/// large vocabulary every pass over the logits counts.
fn sanitize_and_argmax(logits: &mut [f32]) -> usize {
    let mut best = 0;
    let mut max = f32::NEG_INFINITY;
    for (i, logit) in logits.iter_mut().enumerate() {
        if logit.is_nan() {
            *logit = f32::NEG_INFINITY;
        } else if *logit == f32::INFINITY {
            *logit = f32::MAX;
        }
        if *logit > max {
            max = *logit;
            best = i;
        }
    }
    best
}

/// `ln(sum(exp(logits)))`, computed around `max` for stability; `-inf` when
/// every logit is `-inf`.
fn log_sum_exp(logits: &[f32], max: f32) -> f64 {
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = logits.iter().map(|&l| weight(l - max)).sum();
    f64::from(max) + sum.ln()
}

fn log_prob(logit: f32, lse: f64) -> f32 {
    if lse == f64::NEG_INFINITY {
        // No token has any probability; NaN (-inf - -inf) would be worse.
        f32::NEG_INFINITY
    } else {
        (f64::from(logit) - lse) as f32
    }
}

/// The softmax normaliser `ln(sum(exp(logits)))` exactly as the sampler
/// computes it for log-probabilities (a pass for the max, a pass for the
/// sum) once NaN logits have been replaced (see `Sampler::sample`); `-inf`
/// when every logit is `-inf`. Public so that `kestrel microbench` can time
/// the sampler's softmax on its own.
pub fn log_softmax_normalizer(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    log_sum_exp(logits, max)
}

/// The `k` best `(logit, id)` pairs, best first (ties: lowest id), chosen
/// the way top-k sampling chooses them (a k-sized heap up to 1024, then
/// `select_nth_unstable`). Public so that `kestrel microbench` can time the
/// sampler's top-k selection on its own.
pub fn top_k_candidates(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut out = Vec::new();
    let mut heap = BinaryHeap::new();
    let ranked = logits.iter().enumerate().map(|(i, &l)| (l, i as u32));
    select_best(&mut out, &mut heap, ranked, k);
    out.sort_unstable_by(best_first);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    // Named explicitly: proptest's prelude exports another `Rng`.
    use rand::Rng;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    fn sample_once(p: &SamplingParams, logits: &[f32]) -> Sampled {
        let mut l = logits.to_vec();
        Sampler::new(p)
            .sample(&mut l, &[], &[])
            .expect("non-empty logits")
    }

    /// Candidate set the sampling chain keeps, as sorted ids.
    fn kept(p: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        let mut s = Sampler::new(p);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        s.build_candidates(logits, max, 1.0 / p.temperature);
        let mut ids: Vec<u32> = s.candidates.iter().map(|&(_, id)| id).collect();
        ids.sort_unstable();
        ids
    }

    fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - max) / f64::from(t)).exp())
            .collect();
        let z: f64 = w.iter().sum();
        w.into_iter().map(|x| x / z).collect()
    }

    /// Reference top-p: full sort, shortest prefix reaching `p`.
    fn naive_top_p(logits: &[f32], t: f32, p: f64) -> Vec<u32> {
        let probs = softmax(logits, t);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        let mut out = Vec::new();
        for i in order {
            out.push(i as u32);
            cum += probs[i];
            if cum >= p {
                break;
            }
        }
        out.sort_unstable();
        out
    }

    fn pseudo_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-8.0f32..8.0)).collect()
    }

    #[test]
    fn device_request_draws_like_sample_and_lists_the_penalised_tokens() {
        let p = params(|p| {
            p.temperature = 0.8;
            p.seed = Some(7);
            p.repetition_penalty = 1.2;
            p.presence_penalty = 0.5;
            p.top_k = 40;
            p.min_p = 0.1;
        });
        let (mut host, mut device) = (Sampler::new(&p), Sampler::new(&p));
        let logits = pseudo_logits(100, 3);
        let generated = [5u32, 5, 2, 9, 9, 9];
        for step in 0..generated.len() {
            host.sample(&mut logits.clone(), &[1, 2, 2], &generated[..step])
                .unwrap();
            device.device_request(&[1, 2, 2], &generated[..step], 100);
        }
        // One draw per step on both: the seeded streams stay in step.
        assert_eq!(host.rng.random::<u64>(), device.rng.random::<u64>());
        let r = device.device_request(&[1, 2, 2], &[5, 5, 2], 100);
        let mut pens = r.penalties.clone();
        pens.sort_unstable();
        assert_eq!(pens, vec![(1, 0), (2, 1), (5, 2)]);
        assert!(!r.greedy);
        assert_eq!(
            (r.inv_t, r.top_k, r.repetition, r.presence, r.frequency),
            (1.25, 40, 1.2, 0.5, 0.0)
        );
        assert!(r.top_p >= 1.0 && (r.min_p_log - 0.1f32.ln()).abs() < 1e-6);
        // Greedy requests draw nothing; top-k beyond the vocabulary is off.
        let g = params(|p| {
            p.top_k = 500;
            p.frequency_penalty = 0.25;
        });
        let r = Sampler::new(&g).device_request(&[1], &[3, 3], 100);
        assert!(r.greedy && r.top_k == 0 && r.u == 0.0);
        assert_eq!((r.repetition, r.penalties), (1.0, vec![(3, 2)]));
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let p = SamplingParams::default();
        assert_eq!(sample_once(&p, &[0.1, 3.0, -2.0, 2.9]).token, 1);
        assert_eq!(sample_once(&p, &[1.0, 5.0, 5.0, 4.0]).token, 1);
        assert_eq!(sample_once(&p, &[-1.0]).token, 0);
    }

    #[test]
    fn temperature_sampling_matches_softmax_frequencies() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 1.5];
        let t = 0.7;
        let p = params(|p| {
            p.temperature = t;
            p.seed = Some(12345);
        });
        let mut sampler = Sampler::new(&p);
        let draws = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            let mut l = logits.to_vec();
            counts[sampler.sample(&mut l, &[], &[]).unwrap().token as usize] += 1;
        }
        let probs = softmax(&logits, t);
        let chi2: f64 = counts
            .iter()
            .zip(&probs)
            .map(|(&c, &p)| {
                let e = p * draws as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        // 4 degrees of freedom: 18.47 is the 0.1% critical value.
        assert!(
            chi2 < 18.47,
            "chi2 = {chi2}, counts = {counts:?}, probs = {probs:?}"
        );
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for seed in 0..20 {
            let logits = pseudo_logits(1000, seed);
            let greedy = sample_once(&SamplingParams::default(), &logits).token;
            let p = params(|p| {
                p.temperature = 1.5;
                p.top_k = 1;
                p.seed = Some(seed);
            });
            assert_eq!(sample_once(&p, &logits).token, greedy);
        }
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = pseudo_logits(5000, 3);
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_k = 40;
        });
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let mut expected = order[..40].to_vec();
        expected.sort_unstable();
        assert_eq!(kept(&p, &logits), expected);
    }

    #[test]
    fn top_p_keeps_the_minimal_set() {
        // Probabilities 0.5, 0.3, 0.15, 0.05.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let with_p = |top_p| {
            params(|p| {
                p.temperature = 1.0;
                p.top_p = top_p;
            })
        };
        assert_eq!(kept(&with_p(0.4), &logits), vec![0]);
        assert_eq!(kept(&with_p(0.75), &logits), vec![0, 1]);
        assert_eq!(kept(&with_p(0.9), &logits), vec![0, 1, 2]);
        assert_eq!(kept(&with_p(0.99), &logits), vec![0, 1, 2, 3]);
        // And the draw respects it.
        let mut sampler = Sampler::new(&with_p(0.75));
        let mut seen = [false; 4];
        for _ in 0..500 {
            let mut l = logits.clone();
            seen[sampler.sample(&mut l, &[], &[]).unwrap().token as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);
    }

    #[test]
    fn lazy_top_p_matches_full_sort_on_large_vocab() {
        for (seed, top_p, t) in [(1, 0.9, 1.0), (2, 0.5, 0.7), (3, 0.99, 1.3), (4, 0.999, 2.0)] {
            // Flat logits so the kept set spans several lazy batches.
            let logits: Vec<f32> = pseudo_logits(20_000, seed).iter().map(|l| l / 4.0).collect();
            let p = params(|p| {
                p.temperature = t;
                p.top_p = top_p;
            });
            let got = kept(&p, &logits);
            assert!(
                got.len() > TOP_P_FIRST_BATCH || top_p < 0.9,
                "set too small to test laziness"
            );
            assert_eq!(got, naive_top_p(&logits, t, f64::from(top_p)), "seed {seed}");
        }
    }

    #[test]
    fn top_p_handles_flat_and_widely_spread_logits() {
        // All equal: one histogram bucket holds the whole vocabulary.
        let flat = vec![0.5f32; 3000];
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5;
        });
        assert_eq!(kept(&p, &flat), (0..1500).collect::<Vec<u32>>());
        // Spread far past the histogram range, so the last bucket is in play.
        let spread: Vec<f32> = pseudo_logits(4000, 11).iter().map(|l| l * 10.0).collect();
        for top_p in [0.3f32, 0.9, 0.999_999] {
            let p = params(|p| {
                p.temperature = 1.0;
                p.top_p = top_p;
            });
            assert_eq!(kept(&p, &spread), naive_top_p(&spread, 1.0, f64::from(top_p)));
        }
    }

    #[test]
    fn large_top_k_uses_selection_and_matches_sorting() {
        let logits = pseudo_logits(10_000, 21);
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        for k in [HEAP_SELECTION_MAX, HEAP_SELECTION_MAX + 1, 5000] {
            let p = params(|p| {
                p.temperature = 1.0;
                p.top_k = k;
            });
            let mut expected = order[..k].to_vec();
            expected.sort_unstable();
            assert_eq!(kept(&p, &logits), expected, "k = {k}");
        }
    }

    #[test]
    fn top_k_ties_keep_the_lowest_ids() {
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_k = 3;
        });
        assert_eq!(kept(&p, &[1.0, 2.0, 2.0, 1.0, 2.0, 2.0]), vec![1, 2, 4]);
    }

    #[test]
    fn top_p_applies_to_the_top_k_renormalised_distribution() {
        // Probabilities 0.4, 0.3, 0.2, 0.1. Top-k 2 renormalises to 4/7, 3/7,
        // so top-p 0.5 keeps only the first and top-p 0.6 both.
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let p = |top_p| {
            params(|p| {
                p.temperature = 1.0;
                p.top_k = 2;
                p.top_p = top_p;
            })
        };
        assert_eq!(kept(&p(0.5), &logits), vec![0]);
        assert_eq!(kept(&p(0.6), &logits), vec![0, 1]);
    }

    #[test]
    fn min_p_applies_after_top_k_and_top_p() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: top-k 3 and top-p 0.95 keep three;
        // min-p 0.6 then drops 0.2 (0.2 / 0.4 = 0.5 < 0.6).
        let logits: Vec<f32> = [0.4f32, 0.3, 0.2, 0.1].iter().map(|p| p.ln()).collect();
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_k = 3;
            p.top_p = 0.95;
            p.min_p = 0.6;
        });
        assert_eq!(kept(&p, &logits), vec![0, 1]);
    }

    #[test]
    fn min_p_drops_tokens_below_the_threshold() {
        // Probabilities 0.5, 0.2, 0.1, 0.04, ...: min-p 0.15 cuts at 0.075.
        let logits: Vec<f32> = [0.5f32, 0.2, 0.1, 0.04, 0.16].iter().map(|p| p.ln()).collect();
        let p = params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.15;
        });
        assert_eq!(kept(&p, &logits), vec![0, 1, 2, 4]);
        // Temperature flattens the distribution first (vLLM order): at t = 2,
        // p_i / p_max = sqrt(0.04 / 0.5) = 0.28 > 0.15 keeps everything.
        let hot = params(|p| {
            p.temperature = 2.0;
            p.min_p = 0.15;
        });
        assert_eq!(kept(&hot, &logits), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let p = params(|p| p.repetition_penalty = 2.0);
        let mut logits = vec![2.0, -1.0, 0.5, 3.0];
        // Token 0 twice in the prompt is still penalised once.
        Sampler::new(&p).sample(&mut logits, &[0, 0, 1], &[2]).unwrap();
        assert_eq!(logits, vec![1.0, -2.0, 0.25, 3.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let p = params(|p| {
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut logits = vec![2.0, -1.0, 0.5, 3.0];
        Sampler::new(&p).sample(&mut logits, &[0, 3], &[1, 2, 2]).unwrap();
        // 1: -1 - 0.5 - 0.25; 2: 0.5 - 0.5 - 2 * 0.25; prompt tokens untouched.
        assert_eq!(logits, vec![2.0, -1.75, -0.5, 3.0]);
    }

    #[test]
    fn all_penalties_combine_in_chain_order() {
        let p = params(|p| {
            p.repetition_penalty = 2.0;
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25;
        });
        let mut logits = vec![2.0, -1.0, 0.5, 3.0];
        let out = Sampler::new(&p)
            .sample(&mut logits, &[0, 1], &[1, 2, 2, 9])
            .unwrap();
        // 0: 2/2; 1: -1*2 - 0.75; 2: 0.5/2 - 1.0; id 9 is out of vocabulary.
        assert_eq!(logits, vec![1.0, -2.75, -0.75, 3.0]);
        assert_eq!(out.token, 3);
    }

    #[test]
    fn output_counts_are_incremental_and_rebuilt_when_output_shrinks() {
        let p = params(|p| p.frequency_penalty = 1.0);
        let mut sampler = Sampler::new(&p);
        let base = [0.0f32; 3];
        let mut l = base.to_vec();
        sampler.sample(&mut l, &[], &[1]).unwrap();
        assert_eq!(l, vec![0.0, -1.0, 0.0]);
        let mut l = base.to_vec();
        sampler.sample(&mut l, &[], &[1, 1, 2]).unwrap();
        assert_eq!(l, vec![0.0, -2.0, -1.0]);
        let mut l = base.to_vec();
        sampler.sample(&mut l, &[], &[2]).unwrap();
        assert_eq!(l, vec![0.0, 0.0, -1.0]);
    }

    #[test]
    fn same_seed_replays_and_different_seeds_differ() {
        let logits = pseudo_logits(50_000, 9);
        let run = |seed| {
            let p = params(|p| {
                p.temperature = 1.0;
                p.top_p = 0.95;
                p.seed = Some(seed);
            });
            let mut sampler = Sampler::new(&p);
            (0..64)
                .map(|_| {
                    let mut l = logits.clone();
                    sampler.sample(&mut l, &[], &[]).unwrap().token
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn random_seed_is_reported_and_replays() {
        let p = params(|p| {
            p.temperature = 1.0;
            p.seed = None;
        });
        let a = Sampler::new(&p);
        let replay = params(|q| {
            q.temperature = 1.0;
            q.seed = Some(a.seed());
        });
        let logits = pseudo_logits(1000, 5);
        let draw = |mut s: Sampler| {
            (0..32)
                .map(|_| s.sample(&mut logits.clone(), &[], &[]).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(a), draw(Sampler::new(&replay)));
    }

    #[test]
    fn logprobs_are_log_softmax_of_penalised_logits() {
        let p = params(|p| {
            p.temperature = 1.5;
            p.logprobs = Some(3);
            p.repetition_penalty = 2.0;
        });
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let mut l = logits.to_vec();
        let out = Sampler::new(&p).sample(&mut l, &[1], &[]).unwrap();
        // Penalised: [1, 1.5, 2, 0]; temperature does not enter.
        let probs = softmax(&[1.0, 1.5, 2.0, 0.0], 1.0);
        let ids: Vec<u32> = out.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![2, 1, 0]);
        for &(id, lp) in &out.top {
            assert!((f64::from(lp) - probs[id as usize].ln()).abs() < 1e-5);
        }
        let chosen = out.logprob.unwrap();
        assert!((f64::from(chosen) - probs[out.token as usize].ln()).abs() < 1e-5);

        let none = sample_once(&params(|_| {}), &logits);
        assert_eq!((none.logprob, none.top.len()), (None, 0));
        let zero = sample_once(&params(|p| p.logprobs = Some(0)), &logits);
        assert!(zero.logprob.is_some() && zero.top.is_empty());
    }

    #[test]
    fn score_token_is_the_raw_log_softmax_with_the_best_alternatives() {
        let mut l = vec![1.0f32, 3.0, f32::NAN, 2.0, 3.0];
        let (lp, top) = score_token(&mut l, 3, 3).unwrap();
        let probs = softmax(&[1.0, 3.0, f32::NEG_INFINITY, 2.0, 3.0], 1.0);
        assert!((f64::from(lp) - probs[3].ln()).abs() < 1e-6, "{lp}");
        // Ties go to the lowest id; NaN never ranks.
        let ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 4, 3]);
        assert!((f64::from(top[0].1) - probs[1].ln()).abs() < 1e-6);
        let (masked, none) = score_token(&mut l, 2, 0).unwrap();
        assert_eq!((masked, none.len()), (f32::NEG_INFINITY, 0));
        assert_eq!(score_token(&mut l, 99, 1).unwrap().0, f32::NEG_INFINITY);
        assert_eq!(score_token(&mut [], 0, 1), Err(SamplingError::EmptyLogits));
    }

    #[test]
    fn validation_names_each_out_of_range_parameter() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        let cases: Vec<(&str, SamplingParams)> = vec![
            ("temperature", params(|p| p.temperature = -0.1)),
            ("temperature", params(|p| p.temperature = 2.5)),
            ("temperature", params(|p| p.temperature = f32::NAN)),
            ("top_p", params(|p| p.top_p = 0.0)),
            ("top_p", params(|p| p.top_p = 1.01)),
            ("min_p", params(|p| p.min_p = -0.01)),
            ("min_p", params(|p| p.min_p = 1.5)),
            ("repetition_penalty", params(|p| p.repetition_penalty = 0.0)),
            (
                "repetition_penalty",
                params(|p| p.repetition_penalty = f32::INFINITY),
            ),
            ("presence_penalty", params(|p| p.presence_penalty = 2.1)),
            ("presence_penalty", params(|p| p.presence_penalty = -2.1)),
            ("frequency_penalty", params(|p| p.frequency_penalty = 3.0)),
            ("max_tokens", params(|p| p.max_tokens = 0)),
            ("logprobs", params(|p| p.logprobs = Some(21))),
        ];
        for (name, p) in cases {
            match p.validate() {
                Err(SamplingError::OutOfRange {
                    name: got,
                    value,
                    expected,
                }) => {
                    assert_eq!(got, name);
                    assert!(!value.is_empty() && !expected.is_empty());
                    let msg = p.validate().unwrap_err().to_string();
                    assert!(msg.contains(name) && msg.contains(&value), "{msg}");
                }
                other => panic!("{name}: expected OutOfRange, got {other:?}"),
            }
        }
        let empty_stop = params(|p| p.stop = vec!["ok".into(), String::new()]);
        assert_eq!(empty_stop.validate(), Err(SamplingError::EmptyStop { index: 1 }));
        let edges = params(|p| {
            p.temperature = 2.0;
            p.top_p = 1e-6;
            p.min_p = 1.0;
            p.repetition_penalty = 1e-3;
            p.presence_penalty = -2.0;
            p.frequency_penalty = 2.0;
            p.max_tokens = 1;
            p.logprobs = Some(20);
            p.top_k = 1 << 40;
        });
        assert_eq!(edges.validate(), Ok(()));
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.8, "stop": ["\n"]}"#).unwrap();
        assert_eq!(p.temperature, 0.8);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.max_tokens, 256);
        assert_eq!(p.top_p, 1.0);
    }

    #[test]
    fn empty_logits_are_an_error() {
        let mut s = Sampler::new(&SamplingParams::default());
        assert_eq!(s.sample(&mut [], &[], &[]), Err(SamplingError::EmptyLogits));
    }

    #[test]
    fn nan_and_infinite_logits_are_handled() {
        let hot = params(|p| {
            p.temperature = 1.0;
            p.logprobs = Some(2);
        });
        // NaN is never chosen.
        for seed in 0..50 {
            let p = SamplingParams {
                seed: Some(seed),
                ..hot.clone()
            };
            let out = sample_once(&p, &[f32::NAN, 0.0, f32::NAN, 0.0]);
            assert!(out.token == 1 || out.token == 3);
        }
        assert_eq!(
            sample_once(&SamplingParams::default(), &[f32::NAN, -1.0]).token,
            1
        );
        // +inf dominates.
        assert_eq!(sample_once(&hot, &[0.0, f32::INFINITY, 5.0]).token, 1);
        // Nothing usable: still a valid token, and no NaN logprob.
        let out = sample_once(&hot, &[f32::NAN, f32::NEG_INFINITY]);
        assert!(out.token < 2);
        assert!(!out.logprob.unwrap().is_nan());
    }

    /// Kept-set length range of the chain done naively (full sort, f64),
    /// over `order`: `top_p` and `min_p` are nudged by 1e-5 both ways, so
    /// rounding at an exact boundary cannot make the comparison flaky.
    fn naive_chain(logits: &[f32], p: &SamplingParams) -> (Vec<u32>, usize, usize) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        // The same f32 scaled logits as the sampler, so ties agree.
        let s: Vec<f32> = logits.iter().map(|&l| (l - max) * inv_t).collect();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| best_first(&(s[a as usize], a), &(s[b as usize], b)));
        let w: Vec<f64> = order.iter().map(|&i| f64::from(s[i as usize]).exp()).collect();
        let k = if p.top_k == 0 {
            w.len()
        } else {
            p.top_k.min(w.len())
        };
        let z: f64 = w[..k].iter().sum();
        let len = |top_p: f64, min_p: f64| {
            let mut cum = 0.0;
            let mut n = 0;
            while n < k {
                if w[n] < min_p * w[0] {
                    break;
                }
                n += 1;
                cum += w[n - 1];
                if top_p < 1.0 && cum >= top_p * z {
                    break;
                }
            }
            n
        };
        let (top_p, min_p) = (f64::from(p.top_p), f64::from(p.min_p));
        let lo = len(top_p - 1e-5, min_p + 1e-5);
        let hi = len(top_p + 1e-5, (min_p - 1e-5).max(0.0));
        (order, lo, hi)
    }

    proptest! {
        #[test]
        fn chain_matches_a_naive_full_sort(
            logits in prop::collection::vec(-20.0f32..20.0, 1..400),
            temperature in 0.05f32..2.0,
            top_k in prop_oneof![Just(0usize), 1usize..50, 300usize..1500],
            top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
            min_p in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        ) {
            let p = params(|p| {
                p.temperature = temperature;
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
            });
            let got = kept(&p, &logits);
            let (order, lo, hi) = naive_chain(&logits, &p);
            let n = got.len();
            prop_assert!(lo <= n && n <= hi, "kept {} tokens, naive {}..={}", n, lo, hi);
            let mut expected = order[..n].to_vec();
            expected.sort_unstable();
            prop_assert_eq!(got, expected);
        }
    }

    fn logit_strategy() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -30.0f32..30.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
            1 => any::<f32>(),
        ]
    }

    proptest! {
        #[test]
        fn random_logits_always_give_an_in_range_token(
            logits in prop::collection::vec(logit_strategy(), 1..300),
            temperature in prop_oneof![Just(0.0f32), 1e-6f32..2.0],
            top_k in 0usize..400,
            top_p in prop_oneof![Just(1.0f32), 1e-6f32..1.0],
            min_p in prop_oneof![Just(0.0f32), 0.0f32..1.0],
            repetition_penalty in 0.1f32..3.0,
            presence_penalty in -2.0f32..2.0,
            frequency_penalty in -2.0f32..2.0,
            history in prop::collection::vec(0u32..400, 0..50),
            seed in any::<u64>(),
        ) {
            let p = SamplingParams {
                temperature, top_k, top_p, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, seed: Some(seed),
                logprobs: Some(5), ..SamplingParams::default()
            };
            prop_assert!(p.validate().is_ok());
            let mut sampler = Sampler::new(&p);
            let split = history.len() / 2;
            let mut l = logits.clone();
            let out = sampler.sample(&mut l, &history[..split], &history[split..]).unwrap();
            prop_assert!((out.token as usize) < logits.len());
            prop_assert!(!out.logprob.unwrap().is_nan());
            prop_assert!(out.top.iter().all(|&(id, lp)| (id as usize) < logits.len() && !lp.is_nan()));
            // A NaN logit is chosen only when no token has any probability.
            if logits[out.token as usize].is_nan() {
                prop_assert!(l.iter().all(|&x| x == f32::NEG_INFINITY));
            }
        }
    }
}
